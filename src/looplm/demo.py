"""`looplm demo`: the bundled looped model on held-out reasoning problems, under compute and memory budgets.

It measures, on problems the model never saw (the held-out split of `looplm.train.synthetic`):
    accuracy × loops × difficulty      greedy generation with R = 1..R_max loops (per_loop KV)
    Q-exit                             accuracy and mean loops per answer token, by difficulty
    KV strategies                      accuracy, KV bytes per token and decode tokens/s per strategy
and writes a PNG of the curves. Everything goes through `looplm.generate`, as a user's request would.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import load, load_tokenizer
from .engine import generate
from .outputs import is_demo_output, prepare_output_dir

if TYPE_CHECKING:
    from .train import synthetic

BUNDLED = Path(__file__).parent / "bundled"
BUNDLED_NAME = "chain-r4"


def bundled_model_dir(name: str = BUNDLED_NAME) -> Path:
    """The looped model shipped inside the package (trained with recipes/bundled.yaml)."""
    path = BUNDLED / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled model {name!r} is missing from {BUNDLED} (a broken install?)")
    return path


@dataclass
class DemoResult:
    model: str
    task: str
    difficulties: list[int]
    loops: list[int]
    problems_per_difficulty: int
    accuracy: dict[str, list[float]]  # difficulty → accuracy at each loop count (per_loop KV)
    exit_policy: str
    exit_accuracy: dict[str, float]  # difficulty → accuracy under the exit policy
    exit_mean_loops: dict[str, float]  # difficulty → mean loops per answer token under the exit policy
    kv: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy → accuracy, bytes, tokens/s
    seconds: float = 0.0
    seed: int = 12345  # the held-out problems' seed


def heldout_problems(meta: dict[str, Any], difficulty: int, *, count: int, seed: int) -> list[synthetic.Problem]:
    """Held-out problems of one difficulty in the model's task format (looplm_task.json)."""
    from .train import synthetic  # here, so that `looplm.bundled_model_dir` does not import looplm.train

    options = {k: meta[k] for k in synthetic.FORMAT_OPTIONS if k in meta}
    return synthetic.problems(meta["task"], seed=seed, count=count, difficulties=[difficulty], split="heldout",
                              **options)


def _meta(path: Path) -> dict[str, Any]:
    card = path / "looplm_task.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def _plan(tok, problem: synthetic.Problem) -> tuple[list[int | None], list[tuple[int, int, str]]]:
    """What `generate` is forced to emit (None: the model answers) and the spans of the model's answers."""
    force: list[int | None] = []
    answers: list[tuple[int, int, str]] = []
    for text, predicted in problem.segments():
        ids = tok.encode(text, add_special_tokens=False)
        if predicted:
            answers.append((len(force), len(force) + len(ids), text))
            force += [None] * len(ids)
        else:
            force += ids
    return force, answers


def _solve(model, tok, probs, *, batch_size: int, **budget) -> tuple[list[float], list[float], dict[str, float]]:
    """Greedy answers, the later queries of a chain given in turn through the same KV cache.

    Returns per problem the share of its answers right and the mean loops over the tokens the model
    answered, and the run's KV memory and decode speed."""
    right, loops, kv_bytes, per_token, n_decode, t_decode = [], [], 0, 0, 0, 0.0
    for i in range(0, len(probs), batch_size):
        chunk = probs[i : i + batch_size]
        ids = [tok.encode(p.prompt, add_special_tokens=False) for p in chunk]
        plans = [_plan(tok, p) for p in chunk]
        res = generate(model, ids, force=[f for f, _ in plans], stop_tokens=[], **budget)
        for (force, spans), toks, lp in zip(plans, res.new_tokens, res.loops_per_token.tolist()):
            right.append(sum(tok.decode(toks[a:b]) == text for a, b, text in spans) / len(spans))
            ran = [lp[j] for a, b, _ in spans for j in range(a, b)]
            loops.append(sum(ran) / len(ran))
        kv_bytes = max(kv_bytes, res.kv_bytes)
        per_token = res.kv_bytes_per_token
        n_decode += res.num_new_tokens - len(res.new_tokens)
        t_decode += res.decode_seconds
    return right, loops, {"kv_bytes_per_token": per_token, "kv_bytes": kv_bytes,
                          "decode_tokens_per_s": n_decode / t_decode if t_decode else float("nan")}


def run_demo(model_dir: str | Path | None = None, *, per_difficulty: int = 128, exit: str | None = None,
             batch_size: int = 64, seed: int = 12345, progress: bool = True) -> DemoResult:
    """Evaluate the (bundled) model; `exit` defaults to the threshold its model card recommends."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    path = Path(model_dir) if model_dir else bundled_model_dir()
    meta = _meta(path)
    if per_difficulty < 1:
        raise ValueError(f"per_difficulty must be ≥ 1, got {per_difficulty}")
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    if not meta:
        raise ValueError(f"{path} has no looplm_task.json: the demo needs a model trained on a synthetic task")
    model, tok = load(path), load_tokenizer(path)
    task, diffs, R = meta["task"], list(meta["difficulties"]), model.config.num_loops
    # the card's policy (the bundled model's is calibrated); a model without an exit gate (trained by a recipe
    # without one) gets a gate-free policy: stop when successive loops agree
    exit = exit or meta.get("exit") or (f"q:0.5,max={R}" if model.config.exit_gate else f"kl:1e-3,max={R}")
    by_diff = {d: heldout_problems(meta, d, count=per_difficulty, seed=seed) for d in diffs}
    jobs = len(diffs) * (R + 1) + 4
    bar = tqdm(total=jobs, disable=not progress, desc="demo", leave=False)
    accuracy: dict[str, list[float]] = {}
    for d in diffs:
        accuracy[str(d)] = []
        for r in range(1, R + 1):
            right, _, _ = _solve(model, tok, by_diff[d], batch_size=batch_size, num_loops=r, kv="per_loop")
            accuracy[str(d)].append(sum(right) / len(right))
            bar.update()
    exit_acc, exit_loops = {}, {}
    for d in diffs:
        right, loops, _ = _solve(model, tok, by_diff[d], batch_size=batch_size, num_loops=R, exit=exit)
        exit_acc[str(d)] = sum(right) / len(right)
        exit_loops[str(d)] = sum(loops) / len(loops)
        bar.update()
    everything = [p for d in diffs for p in by_diff[d]]
    kv: dict[str, dict[str, float]] = {}
    for strategy in ("per_loop", "last", "mean", "first"):
        right, _, mem = _solve(model, tok, everything, batch_size=batch_size, num_loops=R, kv=strategy)
        kv[strategy] = {"accuracy": sum(right) / len(right), **mem}
        bar.update()
    bar.close()
    return DemoResult(str(path), task, diffs, list(range(1, R + 1)), per_difficulty, accuracy, str(exit), exit_acc,
                      exit_loops, kv, time.perf_counter() - t0, seed)


def format_tables(res: DemoResult) -> str:
    unit = "hops" if res.task == "chain" else "ops"
    lines = [f"{res.task}: {res.problems_per_difficulty} held-out problems per difficulty ({unit}, seed {res.seed}); greedy answers "
             "(accuracy: the share of the queries answered exactly; later queries given in turn)",
             "", "accuracy by loops (per_loop KV)"]
    lines.append(f"{unit:>4}  " + "".join(f"  R={r:<4d}" for r in res.loops))
    for d in res.difficulties:
        lines.append(f"{d:>4}  " + "".join(f"  {a:6.1%}" for a in res.accuracy[str(d)]))
    lines += ["", f"exit {res.exit_policy} (cap R={res.loops[-1]})", f"{unit:>4}  accuracy  mean loops"]
    for d in res.difficulties:
        lines.append(f"{d:>4}  {res.exit_accuracy[str(d)]:8.1%}  {res.exit_mean_loops[str(d)]:10.2f}")
    lines += ["", f"KV strategies at R={res.loops[-1]} (all problems)", "strategy   accuracy  KV B/token  decode tok/s"]
    for k, v in res.kv.items():
        lines.append(f"{k:<9}  {v['accuracy']:8.1%}  {v['kv_bytes_per_token']:10d}  {v['decode_tokens_per_s']:12.0f}")
    return "\n".join(lines)


def plot(res: DemoResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import layered

    unit = "hops" if res.task == "chain" else "ops"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    n = len(res.difficulties)
    for k, d in enumerate(res.difficulties):  # several lines sit at 100%: layered so each stays visible
        a.plot(res.loops, [100 * x for x in res.accuracy[str(d)]], label=f"{d} {unit}", **layered(k, n))
    a.set(xlabel="loops R", ylabel="held-out accuracy (%)", title="Held-out accuracy vs loops, by difficulty",
          xticks=res.loops, ylim=(-5, 105), yticks=range(0, 101, 20))  # markers at 0 and 100% whole
    a.legend(fontsize=8, loc="center left")
    hops = res.difficulties
    b.bar([str(d) for d in hops], [res.exit_mean_loops[str(d)] for d in hops], color="tab:blue")
    for i, d in enumerate(hops):
        b.text(i, res.exit_mean_loops[str(d)] + 0.05, f"{res.exit_accuracy[str(d)]:.1%}", ha="center", fontsize=8)
    b.set(xlabel=unit, ylabel="mean loops per answer token", ylim=(0, res.loops[-1] + 0.5),
          title=f"Mean loops under {res.exit_policy} (label: accuracy)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(res: DemoResult) -> str:
    return json.dumps(asdict(res))


def write(res: DemoResult, out: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """demo.png and demo.json in `out`: absent, empty or a previous demo's output dir, unless overwrite
    (`looplm.outputs`); files of other names there are never touched."""
    from .evaluation.runner import write_json

    out = prepare_output_dir(out, ours=is_demo_output, what="a looplm demo output dir", overwrite=overwrite)
    png = plot(res, out / "demo.png")
    write_json(out / "demo.json", asdict(res))  # atomic
    return png, out / "demo.json"

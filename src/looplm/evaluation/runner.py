"""Run a task under one budget (loops, exit policy, KV strategy), or a sweep of them, with resume.

Every item's result is appended to `<out>/.cache/<run key>.jsonl` as soon as its batch is scored, so an
interrupted sweep resumes where it stopped; the run's JSON (config, per-item results, accuracy with a
95% bootstrap interval, mean loops, KV bytes per token, wall time) is written atomically at the end.
Each cached item keeps the seconds its batch took, so a resumed run reports the time its items took to
score, whichever session scored them. A sweep is checked whole (`check_sweep`) before its first run.
Scoring goes through `looplm.score` / `looplm.generate`, so the KV strategy and per-token exits act
exactly as in generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import KVCache, check_strategy
from ..engine import Generation, score, stop_tokens_for
from ..model import LoopedLM
from .tasks import Item, Task, mc_predictions

SCHEMA = 1


@dataclass(frozen=True)
class RunConfig:
    """One point of a sweep. `loops` caps the loops (static when `exit` is None)."""

    model: str
    task: str
    loops: int | None = None
    exit: str | None = None
    kv: str = "per_loop"
    shots: int = 0
    limit: int | None = None
    chat: bool = False
    seed: int = 0
    core: str | None = None  # "I:J" when a block of the model was looped (a retrofit)
    dtype: str = "float32"

    @property
    def label(self) -> str:
        budget = f"exit={self.exit}" if self.exit else "static"
        block = f"core={self.core} " if self.core else ""
        return f"{block}loops={self.loops or 'default'} {budget} kv={self.kv}"

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def filename(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label.replace(" ", "__"))
        return f"{self.task.replace(':', '_').replace('/', '_')}__{safe}.json"


# --------------------------------------------------------------------------- statistics (pure)


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                 stat: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (or `stat`) of `values`, resampling items."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if len(x) == 0:
        return (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (resamples, len(x)), generator=g)
    samples = x[idx]
    means = samples.mean(1) if stat is None else stat(samples)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """mean(b − a) over paired items with a 95% bootstrap interval and a two-sided bootstrap p-value."""
    d = torch.as_tensor(list(b), dtype=torch.float64) - torch.as_tensor(list(a), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(0, len(d), (resamples, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    # p: how often the resampled mean lands on the other side of 0 (doubled, capped at 1)
    side = float((means <= 0).double().mean()) if d.mean() > 0 else float((means >= 0).double().mean())
    return {"mean": float(d.mean()), "ci95": [lo, hi], "p_value": min(1.0, 2 * side), "n": len(d),
            "significant": not (lo <= 0 <= hi)}


# --------------------------------------------------------------------------- prompts


def encode_prompt(tokenizer, text: str, *, chat: bool) -> list[int]:
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer, context_ids: list[int], context: str, continuation: str, *, chat: bool) -> list[int]:
    """Continuation tokens as lm-eval's `_encode_pair` splits them: encode context + continuation and drop
    as many tokens as the context has, even where a token straddles the boundary (issue 12). The context
    must not end in whitespace (lm-eval moves it into the continuation; tasks.py prompts end in "Answer:")."""
    if not chat:
        whole = list(tokenizer(context + continuation)["input_ids"])
        if len(whole) > len(context_ids):
            return whole[len(context_ids) :]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- one run


class ItemCache:
    """Append-only JSONL of finished items for one run key; a torn last line (a crash mid-write) is dropped."""

    def __init__(self, path: Path | None):
        self.path, self.done = path, {}
        if path is None or not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a write torn by a crash: cut it off before appending again
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        for n, line in enumerate(data.decode().splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: corrupt cache line; delete the file to start this run again") from None
            self.done[row["id"]] = row

    def add(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        for r in rows:
            self.done[r["id"]] = r
        if self.path is None or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


def evaluate(model: LoopedLM, tokenizer, task: Task, cfg: RunConfig, *, cache_path: Path | None = None,
             batch_size: int = 8, progress: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Score every item of `task` under `cfg`; returns the run's JSON-able dict."""
    items = task.items
    if not items:
        raise ValueError(f"task {task.name!r} has no items to score (check --limit)")
    cache = ItemCache(cache_path)
    todo = [it for it in items if it.id not in cache.done]
    check_lengths(model, tokenizer, task, cfg)
    t0 = time.perf_counter()
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{task.name} {cfg.label}", unit="item")
    run = {"mc": _run_mc, "gen": _run_gen, "ppl": _run_ppl}[task.kind]
    for n, batch in enumerate(batches):
        t_batch = time.perf_counter()
        rows = run(model, tokenizer, task, cfg, batch)
        seconds = (time.perf_counter() - t_batch) / len(rows)
        cache.add({**r, "seconds": seconds} for r in rows)  # the batch's time, shared by its items
        if bar is not None:
            bar.update(len(batch))
        if on_batch is not None:
            on_batch(n)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    rows = [cache.done[it.id] for it in items]
    results = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    timed = [r["seconds"] for r in rows if "seconds" in r]  # caches written before items kept their time lack it
    if len(timed) == len(rows):  # every item's time, this session's or a resumed one's (issue 12: not 0.00)
        wall_seconds, per_item = sum(timed), sum(timed) / len(timed)
    else:
        wall_seconds, per_item = wall, (wall / len(todo) if todo else math.nan)
    return summarize(model, task, cfg, results, wall_seconds=wall_seconds, seconds_per_item=per_item)


def _run_mc(model, tokenizer, task: Task, cfg: RunConfig, batch: list[Item]) -> list[dict]:
    contexts, conts, owners = [], [], []
    for it in batch:
        ctx = encode_prompt(tokenizer, it.prompt, chat=cfg.chat)
        for c in it.choices:
            contexts.append(ctx)
            conts.append(encode_pair(tokenizer, ctx, it.prompt, c, chat=cfg.chat))
            owners.append(it)
    res = score(model, contexts, conts, num_loops=cfg.loops, exit=cfg.exit, kv=cfg.kv)
    out, k = [], 0
    for it in batch:
        n = len(it.choices)
        lls = [sum(lp) for lp in res.logprobs[k : k + n]]
        loops = [x for row in res.loops[k : k + n] for x in row]
        pred, pred_norm = mc_predictions(it, lls)  # lm-eval's acc / acc_norm (per character of the choice)
        out.append({"id": it.id, "answer": it.answer, "pred": pred, "pred_norm": pred_norm,
                    "correct": float(pred == it.answer), "correct_norm": float(pred_norm == it.answer),
                    "loglik": lls, "loops": sum(loops) / len(loops), "tokens": len(loops)})
        k += n
    return out


def run_until(gen: Generation, decode: Callable[[list[int]], str], *, stop_ids: set[int],
              until: Sequence[str]) -> tuple[list[str], list[int]]:
    """Consume `gen` until every row has emitted a stop token or a stop string.

    Returns each row's text (stop tokens dropped, cut at the earliest stop string) and the number of
    steps its answer took (tokens generated after a row's answer ended are not its compute).
    """
    B = len(gen.ids)
    tokens: list[list[int]] = [[] for _ in range(B)]
    steps: list[int | None] = [None] * B
    for step in gen:
        for i, (tok, active) in enumerate(zip(step.tokens.tolist(), step.active.tolist())):
            if steps[i] is not None:
                continue
            if not active:  # finished by a stop token at the previous step
                steps[i] = step.index
                continue
            if tok in stop_ids:
                steps[i] = step.index + 1
                continue
            tokens[i].append(tok)
            if any(s and s in decode(tokens[i]) for s in until):
                steps[i] = step.index + 1
        if all(n is not None for n in steps):
            break
    texts = [cut_at_stop(decode(t), until) for t in tokens]
    return texts, [len(gen.steps) if n is None else n for n in steps]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """text up to the earliest stop string (empty stop strings are ignored)."""
    cut = len(text)
    for s in until:
        if s and (k := text.find(s)) != -1:
            cut = min(cut, k)
    return text[:cut]


def _run_gen(model, tokenizer, task: Task, cfg: RunConfig, batch: list[Item]) -> list[dict]:
    prompts = [encode_prompt(tokenizer, it.prompt, chat=cfg.chat) for it in batch]
    stop = set(stop_tokens_for(model.config, tokenizer))
    gen = Generation(model, prompts, max_new_tokens=task.max_new_tokens, num_loops=cfg.loops, exit=cfg.exit,
                     kv=cfg.kv, stop_tokens=sorted(stop), pad_token_id=tokenizer.pad_token_id)
    texts, ends = run_until(gen, tokenizer.decode, stop_ids=stop, until=task.stop)
    loops = torch.stack([s.loops for s in gen.steps], 1)  # (B, N)
    out = []
    for i, it in enumerate(batch):
        ran = loops[i, : ends[i]]
        ran = ran[ran > 0]
        out.append({"id": it.id, "answer": it.answer, "completion": texts[i], "extracted": task.extract(texts[i]),
                    "correct": float(task.is_correct(it, texts[i])), "loops": float(ran.float().mean()),
                    "tokens": int(len(ran))})
    return out


def _run_ppl(model, tokenizer, task: Task, cfg: RunConfig, batch: list[Item], *, window: int = 512) -> list[dict]:
    out = []
    for it in batch:
        ids = list(tokenizer(it.prompt)["input_ids"])
        window = min(window, model.config.max_position_embeddings)
        nll, n, loops = 0.0, 0, 0
        for start in range(0, len(ids) - 1, window - 1):  # disjoint windows, each conditioned on its first token
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            res = score(model, [chunk[:1]], [chunk[1:]], num_loops=cfg.loops, exit=cfg.exit, kv=cfg.kv)
            nll -= sum(res.logprobs[0])
            n += len(chunk) - 1
            loops += sum(res.loops[0])
        out.append({"id": it.id, "nll": nll, "tokens": n, "bytes": len(it.prompt.encode("utf-8")),
                    "loops": loops / max(1, n)})
    return out


def check_lengths(model: LoopedLM, tokenizer, task: Task, cfg: RunConfig) -> None:
    """Refuse a run whose prompts (+ answers or generated tokens) exceed the model's position limit."""
    limit = model.config.max_position_embeddings
    if task.kind == "ppl":
        return  # scored in windows that fit
    for it in task.items:
        n = len(encode_prompt(tokenizer, it.prompt, chat=cfg.chat))
        extra = task.max_new_tokens if task.kind == "gen" else max(
            len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in it.choices)
        if n + extra > limit:
            raise ValueError(
                f"{task.name} item {it.id!r}: prompt of {n} tokens + {extra} {'new' if task.kind == 'gen' else 'answer'} "
                f"tokens exceeds max_position_embeddings={limit}; use fewer --shots or a smaller --limit")


def summarize(model: LoopedLM, task: Task, cfg: RunConfig, results: list[dict], *, wall_seconds: float,
              seconds_per_item: float) -> dict:
    """The run's JSON. wall_seconds: the time spent scoring its items (summed over the sessions of a
    resumed run); seconds_per_item: that time per item."""
    metrics: dict[str, Any] = {}
    if task.kind == "ppl":
        nll = [r["nll"] for r in results]
        tok = [r["tokens"] for r in results]
        per_token = sum(nll) / max(1, sum(tok))
        lo, hi = _ratio_ci(nll, tok, seed=cfg.seed)
        metrics = {"nll_per_token": per_token, "perplexity": math.exp(per_token),
                   "ci95_perplexity": [math.exp(lo), math.exp(hi)],
                   "bits_per_byte": sum(nll) / math.log(2) / max(1, sum(r["bytes"] for r in results))}
        main = "perplexity"
    else:
        acc = [r["correct"] for r in results]
        metrics = {"accuracy": sum(acc) / len(acc), "ci95": list(bootstrap_ci(acc, seed=cfg.seed))}
        if task.kind == "mc":
            norm = [r["correct_norm"] for r in results]
            metrics.update(accuracy_norm=sum(norm) / len(norm), ci95_norm=list(bootstrap_ci(norm, seed=cfg.seed)))
        main = "accuracy"
    tokens = sum(r["tokens"] for r in results)
    mean_loops = sum(r["loops"] * r["tokens"] for r in results) / max(1, tokens)
    R, _ = model.resolve_budget(cfg.loops, cfg.exit)
    kv_cache = KVCache(model.config, batch_size=1, max_len=1, num_loops=R, strategy=cfg.kv, dtype=model.dtype)
    return {
        "schema": SCHEMA,
        "config": asdict(cfg),
        "task": {"name": task.name, "kind": task.kind, "source": task.source, "n_items": len(results)},
        "main_metric": main,
        "metrics": metrics,
        "mean_loops": mean_loops,
        "max_loops": R,
        "kv_bytes_per_token": kv_cache.bytes_per_token,
        "wall_seconds": wall_seconds,
        "seconds_per_item": seconds_per_item,
        "items": results,
    }


def _ratio_ci(nll: list[float], tok: list[int], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of Σnll/Σtokens, resampling documents."""
    x, n = torch.tensor(nll, dtype=torch.float64), torch.tensor(tok, dtype=torch.float64)
    idx = torch.randint(0, len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(seed))
    ratios = x[idx].sum(1) / n[idx].sum(1).clamp(min=1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- sweeps


def sweep_configs(model: str, task: str, *, loops: Sequence[int | None], exits: Sequence[str], kvs: Sequence[str],
                  shots: int = 0, limit: int | None = None, chat: bool = False, seed: int = 0,
                  core: str | None = None, dtype: str = "float32") -> list[RunConfig]:
    """Static runs at every loop count, and each exit policy capped at the largest loop count, per KV strategy."""
    cap = max((x for x in loops if x is not None), default=None)
    common = dict(shots=shots, limit=limit, chat=chat, seed=seed, core=core, dtype=dtype)
    out = []
    for kv in kvs:
        out += [RunConfig(model, task, r, None, kv, **common) for r in loops]
        out += [RunConfig(model, task, cap, e, kv, **common) for e in exits]
    return out


def check_sweep(model: LoopedLM, tokenizer, task: Task, configs: Sequence[RunConfig]) -> None:
    """ValueError naming the first run of a sweep that cannot run: an unknown KV strategy, an exit policy
    the model cannot follow (q: needs an exit gate; min= above the loops run), a bad loop count, prompts
    longer than the model's positions. Checked before any run starts, so a bad point of the sweep fails
    in seconds, not after the runs before it (issue 12)."""
    if not task.items:
        raise ValueError(f"task {task.name!r} has no items to score (check --limit)")
    for cfg in configs:
        try:
            check_strategy(cfg.kv)
            model.resolve_budget(cfg.loops, cfg.exit)
        except ValueError as e:
            raise ValueError(f"run {cfg.label!r}: {e}") from None
    for chat in {cfg.chat for cfg in configs}:
        check_lengths(model, tokenizer, task, next(cfg for cfg in configs if cfg.chat == chat))


def run_sweep(model: LoopedLM, tokenizer, task: Task, configs: Sequence[RunConfig], out_dir: Path, *,
              batch_size: int = 8, progress: bool = True) -> list[Path]:
    check_sweep(model, tokenizer, task, configs)
    paths = []
    for cfg in configs:
        path = out_dir / cfg.filename()
        result = evaluate(model, tokenizer, task, cfg, cache_path=out_dir / ".cache" / f"{cfg.key()}.jsonl",
                          batch_size=batch_size, progress=progress)
        write_json(path, result)
        paths.append(path)
    return paths


def split_policies(text: str | None) -> list[str]:
    """"q:0.3,q:0.6,min=2,conv:0.02" → ["q:0.3", "q:0.6,min=2", "conv:0.02"] (min=/max= bind to the policy before)."""
    if not text:
        return []
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.startswith(("min=", "max=")) and out:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


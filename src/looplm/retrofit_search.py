"""Block search for retrofits: which block i..j-1 of a pretrained model, looped r times, scores best?

Every candidate (i, j, r) is scored on a probe split of a multiple-choice task by log-likelihood
(accuracy and the gold answer's NLL per token), exactly as `looplm.score` scores the model
`looplm.load(dir, core=(i, j), num_loops=r)`, but without recomputing what candidates share:

- one unlooped forward per batch of probe items keeps the hidden state entering every layer
  (h_0 = embeddings, h_l = after layers 0..l-1). The prelude of any block starting at i is h_i, and
  loop 1 of block i..j-1 *is* the unlooped model's layers i..j-1, so its output is h_j;
- loop r ≥ 2 starts from loop r-1's output, so loops 2 and 3 of a block cost two core passes, not three;
- only the coda (layers j..N-1) and the head run per candidate, the head only where a choice token
  is predicted;
- each item is one packed row: the context, then every choice, each choice attending to the context
  and to itself only ("tree" mask, RoPE positions continuing the context), so a context is computed
  once for all its choices, as `looplm.score` does with its prefill cache.

Per-item log-likelihoods go to a JSON cache (written atomically after every batch), keyed by
candidate and item, so an interrupted search resumes and a wider search reuses what is done. Ranking
is by the paired difference to the unlooped model (r = 1) with a bootstrap interval; the top k are
re-scored on held-out items to see which gains survive (small probes overfit: issue 6).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .evaluation.runner import encode_pair, encode_prompt, paired_difference
from .evaluation.tasks import Item
from .loops import LoopRun
from .model import LoopedLM, _Context

BASE = "base"  # the cache key of the unlooped model (every block with r = 1)
METRICS = ("acc", "nll")


# --------------------------------------------------------------------------- candidates and specs


@dataclass(frozen=True, order=True)
class Candidate:
    """Layers start..end-1 looped `loops` times (prelude = layers before, coda = layers after)."""

    start: int
    end: int
    loops: int

    @property
    def key(self) -> str:
        return f"{self.start}:{self.end}:{self.loops}"

    @property
    def core(self) -> str:
        return f"{self.start}:{self.end}"


def parse_ints(spec: str, *, what: str, minimum: int = 1) -> list[int]:
    """"1-8" → [1..8]; "1,2,4" and "1-3,6" also; each value ≥ minimum. ValueError naming `what` otherwise."""
    out: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ValueError(f"{what} {spec!r}: {part!r} is not an integer or a range A-B") from None
        if a < minimum or b < a:
            raise ValueError(f"{what} {spec!r}: {part!r} must be ≥ {minimum} (and A ≤ B in a range A-B)")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def make_candidates(num_layers: int, *, sizes: Sequence[int], loops: Sequence[int],
                    starts: Sequence[int] | None = None) -> list[Candidate]:
    """Every block of a size in `sizes` (starting at a layer in `starts`, default all) × every loop count."""
    for r in loops:
        if r < 2:
            raise ValueError(f"loops must be ≥ 2 (r = 1 is the unlooped baseline every candidate is compared to), got {r}")
    for k in sizes:
        if not 1 <= k <= num_layers:
            raise ValueError(f"block size {k} is outside 1..{num_layers} (the model has {num_layers} layers)")
    for i in starts or ():
        if not 0 <= i < num_layers:
            raise ValueError(f"start layer {i} is outside 0..{num_layers - 1}")
    allowed = set(range(num_layers)) if starts is None else set(starts)
    out = [Candidate(i, i + k, r) for k in sizes for i in range(num_layers - k + 1) if i in allowed for r in loops]
    if not out:
        raise ValueError(f"no block of sizes {list(sizes)} starts at layers {sorted(allowed)} of {num_layers} layers")
    return sorted(out)


# --------------------------------------------------------------------------- probe items, packed


@dataclass
class Encoded:
    """An item as token ids: the context and each choice's continuation (as `looplm eval` encodes them)."""

    id: str
    context: list[int]
    choices: list[list[int]]
    answer: int

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) for c in self.choices)


def encode_items(tokenizer, items: Sequence[Item]) -> list[Encoded]:
    """Token ids of multiple-choice items, raw prompts (no chat template), like the eval runner."""
    out = []
    for it in items:
        if it.choices is None or not isinstance(it.answer, int):
            raise ValueError(f"item {it.id!r} is not multiple choice; the search needs an mc task (arc-easy, mmlu, mc:PATH)")
        ctx = encode_prompt(tokenizer, it.prompt, chat=False)
        out.append(Encoded(it.id, ctx, [encode_pair(tokenizer, ctx, it.prompt, c, chat=False) for c in it.choices],
                           it.answer))
    return out


@dataclass
class Packed:
    """A batch of items packed into rows: each item is its context, then every choice; a row holds
    several items back to back (first fit), so there is little padding."""

    ids: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, S) RoPE positions: from 0 per item; each choice continues its context
    mask: torch.Tensor  # (B, 1, S, S) True = may attend: causal, within the item, never another choice
    rows: torch.Tensor  # (P,) batch row of each prediction of a choice token
    cols: torch.Tensor  # (P,) the position whose output predicts it
    targets: torch.Tensor  # (P,) the predicted token
    choice_of: torch.Tensor  # (P,) index of its choice in the flat choice list of `items`
    items: list[Encoded]  # in the order of the flat choice list


def _first_fit(items: Sequence[Encoded], width: int) -> list[list[Encoded]]:
    """Items (longest first) into rows of `width` tokens: each goes to the first row it fits in."""
    rows: list[list[Encoded]] = []
    free: list[int] = []
    for it in sorted(items, key=lambda it: (-it.length, it.id)):
        k = next((r for r, f in enumerate(free) if f >= it.length), None)
        if k is None:
            rows.append([])
            free.append(width)
            k = len(rows) - 1
        rows[k].append(it)
        free[k] -= it.length
    return rows


def pack(items: Sequence[Encoded], *, width: int | None = None) -> Packed:
    """Pack items into rows of `width` tokens (default: the longest item)."""
    S = max(it.length for it in items) if width is None else width
    if S < max(it.length for it in items):
        raise ValueError(f"pack width {S} is shorter than an item of {max(it.length for it in items)} tokens")
    layout = _first_fit(items, S)
    B = len(layout)
    ids = torch.zeros(B, S, dtype=torch.long)
    positions = torch.zeros(B, S, dtype=torch.long)
    item_of = torch.full((B, S), -1, dtype=torch.long)  # item slot in the row; -1 padding
    part_of = torch.full((B, S), -1, dtype=torch.long)  # 0 context, c+1 choice c
    rows, cols, targets, choice_of, order = [], [], [], [], []
    flat = 0
    for b, row_items in enumerate(layout):
        at = 0
        for slot, it in enumerate(row_items):
            order.append(it)
            n = len(it.context)
            ids[b, at : at + n] = torch.tensor(it.context)
            positions[b, at : at + n] = torch.arange(n)
            item_of[b, at : at + it.length] = slot
            part_of[b, at : at + n] = 0
            last_ctx = at + n - 1
            at += n
            for c, toks in enumerate(it.choices):
                k = len(toks)
                ids[b, at : at + k] = torch.tensor(toks)
                positions[b, at : at + k] = torch.arange(n, n + k)
                part_of[b, at : at + k] = c + 1
                for m in range(k):  # token m is predicted by the context's last position, then by token m-1
                    rows.append(b)
                    cols.append(last_ctx if m == 0 else at + m - 1)
                    targets.append(toks[m])
                    choice_of.append(flat)
                at += k
                flat += 1
    idx = torch.arange(S)
    causal = (idx[None, :] <= idx[:, None])[None]  # (1, S, S)
    same_item = (item_of[:, :, None] == item_of[:, None, :]) & (item_of[:, :, None] >= 0)  # (B, S, S)
    pk, pq = part_of[:, None, :], part_of[:, :, None]
    mask = causal & same_item & ((pk == 0) | (pk == pq))
    mask = mask | torch.eye(S, dtype=torch.bool)[None]  # padding attends to itself (no all -inf row)
    return Packed(ids, positions, mask[:, None], torch.tensor(rows), torch.tensor(cols), torch.tensor(targets),
                  torch.tensor(choice_of), order)


def batches(items: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Items in chunks of batch_size, in task order (`pack` fills rows first fit, so no sorting is needed)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return [list(items[k : k + batch_size]) for k in range(0, len(items), batch_size)]


# --------------------------------------------------------------------------- scoring with reuse


def check_searchable(model: LoopedLM) -> None:
    """The search runs the model's layers as one plain stack; a model with loop machinery is not that."""
    cfg = model.config
    if cfg.loop_norm or cfg.injection != "none":
        raise ValueError(f"block search needs a plain pretrained model (Llama/Qwen/Mistral/SmolLM2/Gemma-3); this one has "
                         f"loop_norm={cfg.loop_norm}, injection={cfg.injection!r}")


def _context(model: LoopedLM, p: Packed) -> _Context:
    return model.packed_context(p.positions.to(model.device), p.mask.to(model.device))


def unlooped_states(model: LoopedLM, p: Packed, ctx: _Context) -> list[torch.Tensor]:
    """h[l] = the hidden state entering layer l (h[0] embeddings, h[N] after the last layer), each (B, S, D)."""
    h = [model.token_embedding(p.ids.to(model.device))]
    for layer_idx, layer in enumerate(model.layers):
        h.append(layer(h[-1], ctx, layer_idx, 0))
    return h


def choice_logliks(model: LoopedLM, p: Packed, x: torch.Tensor, ctx: _Context, start: int) -> torch.Tensor:
    """Run layers start..N-1 (the coda) on x (B, S, D), then norm and head where choice tokens are
    predicted; returns the summed log-prob of every choice in the batch, (C,) float64."""
    for layer_idx in range(start, len(model.layers)):
        x = model.layers[layer_idx](x, ctx, layer_idx, 0)
    dev, S = x.device, x.shape[1]
    # the context's last position predicts every choice's first token: run the head there once
    where, inverse = torch.unique(p.rows * S + p.cols, return_inverse=True)
    h = x.flatten(0, 1)[where.to(dev)]  # (U, D)
    logp = torch.log_softmax(model.softcap(model.lm_head(model.norm(h))).float(), -1)  # (U, V)
    tok = logp[inverse.to(dev), p.targets.to(dev)].double()  # (P,)
    C = sum(len(it.choices) for it in p.items)
    return torch.zeros(C, dtype=torch.float64, device=dev).index_add_(0, p.choice_of.to(dev), tok).cpu()


def _split(p: Packed, flat: torch.Tensor) -> dict[str, list[float]]:
    out, k = {}, 0
    for it in p.items:
        out[it.id] = flat[k : k + len(it.choices)].tolist()
        k += len(it.choices)
    return out


@torch.inference_mode()
def score_batch(model: LoopedLM, p: Packed, cands: Sequence[Candidate], *, base: bool = True,
                on_candidate: Callable[[], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """{candidate key (or BASE): {item id: log-likelihood of each choice}} for one packed batch.

    Loop 1 of block i..j-1 equals the unlooped layers, so loop r ≥ 2 starts from h[j]; the loops of
    one block are run once for all its loop counts. on_candidate is called after each one (progress)."""
    ctx = _context(model, p)
    h = unlooped_states(model, p, ctx)
    N = len(model.layers)
    out: dict[str, dict[str, list[float]]] = {}
    if base:
        out[BASE] = _split(p, choice_logliks(model, p, h[N], ctx, N))
    by_block: dict[tuple[int, int], list[int]] = {}
    for c in cands:
        by_block.setdefault((c.start, c.end), []).append(c.loops)
    for (i, j), loop_counts in sorted(by_block.items()):
        for loop in LoopRun(model, h[j], ctx, max(loop_counts), start=1, block=(i, j)):  # h[j]: loop 1's output
            if loop.loop in loop_counts:
                out[Candidate(i, j, loop.loop).key] = _split(p, choice_logliks(model, p, loop.hidden, ctx, j))
                if on_candidate is not None:
                    on_candidate()
    return out


# --------------------------------------------------------------------------- the on-disk cache


class ResultCache:
    """{candidate key: {item id: [log-likelihood per choice]}} in one JSON file, replaced atomically.

    The file names the model, task and encoding it belongs to (`meta`); one made for something
    else is an error, not a silent mix."""

    def __init__(self, path: Path | None, meta: dict):
        self.path, self.meta, self.results = path, meta, {}
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path}: corrupt search cache; delete it to start over") from None
        if data.get("meta") != meta:
            raise ValueError(f"{path}: a search cache for {data.get('meta')}, not {meta}; use another --out")
        self.results = data["results"]

    def missing(self, key: str, ids: Sequence[str]) -> bool:
        done = self.results.get(key, {})
        return any(i not in done for i in ids)

    def add(self, scores: dict[str, dict[str, list[float]]]) -> None:
        for key, per_item in scores.items():
            self.results.setdefault(key, {}).update(per_item)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "results": self.results}))
        os.replace(tmp, self.path)  # a reader (or a resumed run) never sees half a file


def cache_meta(model: LoopedLM, task_name: str, *, shots: int, seed: int) -> dict:
    cfg = model.config
    return {"model": str(getattr(model, "name_or_path", cfg.source.get("path", "?"))), "layers": cfg.num_layers,
            "task": task_name, "shots": shots, "seed": seed, "dtype": str(model.dtype).removeprefix("torch.")}


def cache_file(out: Path, meta: dict) -> Path:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return out / ".cache" / f"{digest}.json"


def run(model: LoopedLM, items: Sequence[Encoded], cands: Sequence[Candidate], cache: ResultCache, *,
        batch_size: int = 16, progress: bool = True, desc: str = "search",
        on_batch: Callable[[int], None] | None = None) -> float:
    """Score every candidate (and the baseline) on every item, skipping what the cache holds; saves the
    cache after each batch. Returns the seconds spent computing."""
    check_searchable(model)
    if not items:
        return 0.0
    groups = batches(items, batch_size)
    width = max(it.length for it in items)  # one row width for every batch: rows hold several short items
    todo = []
    for g in groups:
        ids = [it.id for it in g]
        need = [c for c in cands if cache.missing(c.key, ids)]
        if need or cache.missing(BASE, ids):
            todo.append((g, need))
    bar = None
    if progress and todo:
        from tqdm import tqdm

        total = sum(len(g) * (1 + len(need)) for g, need in todo)
        bar = tqdm(total=total, desc=f"{desc} ({len(cands)} candidates × {len(items)} items)", unit="cand·item")
    t0 = time.perf_counter()
    for n, (g, need) in enumerate(todo):
        tick = None if bar is None else (lambda n=len(g): bar.update(n))
        if bar is not None:
            bar.update(len(g))  # the baseline (the unlooped forward every candidate reuses)
        cache.add(score_batch(model, pack(g, width=width), need, on_candidate=tick))
        cache.save()
        if on_batch is not None:
            on_batch(n)
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- ranking


@dataclass
class ItemScores:
    """Per-item results of one candidate on one split."""

    correct: list[float]  # 1 if the gold choice has the highest log-likelihood
    nll: list[float]  # the gold choice's NLL per token

    @property
    def acc(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)


def item_scores(cache: ResultCache, key: str, items: Sequence[Encoded]) -> ItemScores:
    done = cache.results[key]
    correct, nll = [], []
    for it in items:
        ll = done[it.id]
        correct.append(float(max(range(len(ll)), key=ll.__getitem__) == it.answer))
        nll.append(-ll[it.answer] / len(it.choices[it.answer]))
    return ItemScores(correct, nll)


def paired_delta(base: ItemScores, cand: ItemScores, metric: str, *, resamples: int, seed: int) -> dict:
    """Paired bootstrap of the gain over the baseline: Δacc, or the NLL drop (both: > 0 is better)."""
    if metric == "acc":
        return paired_difference(base.correct, cand.correct, resamples=resamples, seed=seed)
    return paired_difference(cand.nll, base.nll, resamples=resamples, seed=seed)


@dataclass
class Ranked:
    candidate: Candidate
    acc: float
    nll: float
    delta_acc: dict  # paired_difference vs the baseline: mean, ci95, p_value, significant
    delta_nll: dict  # baseline NLL − candidate NLL (> 0: the gold answer got likelier)
    held_out: dict | None = None  # the same on held-out items, for the top k

    @property
    def survives(self) -> str | None:
        """On held-out items: "yes" (gain > 0, interval above 0), "weak" (gain > 0), "no"; None if not re-scored."""
        if self.held_out is None:
            return None
        d = self.held_out["delta"]
        return "yes" if d["ci95"][0] > 0 else "weak" if d["mean"] > 0 else "no"


def rank(cache: ResultCache, items: Sequence[Encoded], cands: Sequence[Candidate], *, metric: str = "acc",
         resamples: int = 2000, seed: int = 0) -> tuple[ItemScores, list[Ranked]]:
    """(baseline scores, candidates best first by the paired gain in `metric`, ties by the other metric)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {list(METRICS)}")
    base = item_scores(cache, BASE, items)
    out = []
    for c in cands:
        s = item_scores(cache, c.key, items)
        out.append(Ranked(c, s.acc, s.mean_nll, paired_delta(base, s, "acc", resamples=resamples, seed=seed),
                          paired_delta(base, s, "nll", resamples=resamples, seed=seed)))
    other = "nll" if metric == "acc" else "acc"
    out.sort(key=lambda r: (-getattr(r, f"delta_{metric}")["mean"], -getattr(r, f"delta_{other}")["mean"],
                            r.candidate))
    return base, out


def recheck(cache: ResultCache, held: Sequence[Encoded], top: Sequence[Ranked], *, metric: str,
            resamples: int = 2000, seed: int = 0) -> None:
    """Attach held-out results (already in the cache) to the top candidates."""
    base = item_scores(cache, BASE, held)
    for r in top:
        s = item_scores(cache, r.candidate.key, held)
        r.held_out = {"acc": s.acc, "nll": s.mean_nll, "base_acc": base.acc, "base_nll": base.mean_nll,
                      "delta": paired_delta(base, s, metric, resamples=resamples, seed=seed)}


# --------------------------------------------------------------------------- the whole search


@dataclass
class SearchResult:
    task: str
    metric: str
    num_layers: int
    probe_items: int
    held_out_items: int
    base_acc: float
    base_nll: float
    ranked: list[Ranked]
    seconds: float  # computing on the probe in this run (0 when all came from the cache)
    held_out_seconds: float
    scored_candidates: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, row in zip(self.ranked, d["ranked"]):
            row["candidate"] = {"start": r.candidate.start, "end": r.candidate.end, "loops": r.candidate.loops}
            row["survives"] = r.survives
        return d


def search(model: LoopedLM, tokenizer, task, cands: Sequence[Candidate], *, limit: int, holdout: int = 0,
           top_k: int = 5, metric: str = "acc", out: Path | None = None, batch_size: int = 16,
           shots: int = 0, seed: int = 0, progress: bool = True,
           on_batch: Callable[[int], None] | None = None) -> SearchResult:
    """Score `cands` on the task's first `limit` items, rank them against the unlooped model, re-score
    the top_k on the next `holdout` items. Results are cached under out/.cache and resumed."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {list(METRICS)}")
    if limit < 1 or holdout < 0 or top_k < 0:
        raise ValueError(f"need limit ≥ 1, holdout ≥ 0, top_k ≥ 0; got limit={limit}, holdout={holdout}, top_k={top_k}")
    if task.kind != "mc":
        raise ValueError(f"task {task.name!r} is a {task.kind} task; the search scores multiple-choice tasks")
    if limit + holdout > len(task.items):
        raise ValueError(f"task {task.name!r} has {len(task.items)} items; limit {limit} + holdout {holdout} is more")
    N = model.config.num_layers
    for c in cands:
        if not (0 <= c.start < c.end <= N and c.loops >= 2):
            raise ValueError(f"candidate {c.key} is not a block of {N} layers looped ≥ 2 times")
    meta = cache_meta(model, task.name, shots=shots, seed=seed)
    cache = ResultCache(None if out is None else cache_file(out, meta), meta)
    probe = encode_items(tokenizer, task.items[:limit])
    held = encode_items(tokenizer, task.items[limit : limit + holdout])
    seconds = run(model, probe, cands, cache, batch_size=batch_size, progress=progress, on_batch=on_batch)
    base, ranked = rank(cache, probe, cands, metric=metric, seed=seed)
    held_seconds = 0.0
    if held and top_k:
        top = ranked[:top_k]
        held_seconds = run(model, held, [r.candidate for r in top], cache, batch_size=batch_size,
                           progress=progress, desc="held-out")
        recheck(cache, held, top, metric=metric, seed=seed)
    return SearchResult(task.name, metric, N, len(probe), len(held), base.acc, base.mean_nll, ranked, seconds,
                        held_seconds, len(cands), meta)


# --------------------------------------------------------------------------- outputs


def table(res: SearchResult, *, rows: int = 15) -> str:
    """Markdown table of the best candidates."""
    head = (f"| rank | core | loops | acc | Δacc [95% CI] | NLL | ΔNLL↓ [95% CI] | held-out Δ{res.metric} [95% CI] "
            f"| survives |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| – | (unlooped) | 1 | {res.base_acc:.3f} | | {res.base_nll:.3f} | | | |"]
    for n, r in enumerate(res.ranked[:rows], start=1):
        da, dn = r.delta_acc, r.delta_nll
        held = ""
        if r.held_out is not None:
            d = r.held_out["delta"]
            held = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        lines.append(f"| {n} | {r.candidate.core} | {r.candidate.loops} | {r.acc:.3f} | {da['mean']:+.3f} "
                     f"[{da['ci95'][0]:+.3f}, {da['ci95'][1]:+.3f}] | {r.nll:.3f} | {dn['mean']:+.3f} "
                     f"[{dn['ci95'][0]:+.3f}, {dn['ci95'][1]:+.3f}] | {held} | {r.survives or ''} |")
    return head + "\n".join(lines) + "\n"


def heatmap(res: SearchResult, path: Path) -> Path:
    """Δscore (vs the unlooped model) over start layer i × end layer j, one panel per loop count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import integer_ticks

    N = res.num_layers
    loop_counts = sorted({r.candidate.loops for r in res.ranked})
    grids = {r: torch.full((N + 1, N), math.nan) for r in loop_counts}  # [j, i]
    for r in res.ranked:
        grids[r.candidate.loops][r.candidate.end, r.candidate.start] = getattr(r, f"delta_{res.metric}")["mean"]
    finite = [g[~g.isnan()].abs().max().item() for g in grids.values() if (~g.isnan()).any()]
    lim = max(finite + [1e-9])
    fig, axes = plt.subplots(1, len(loop_counts), figsize=(5.2 * len(loop_counts), 4.6), squeeze=False)
    for ax, r in zip(axes[0], loop_counts):
        im = ax.imshow(grids[r].numpy(), origin="lower", cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                       interpolation="nearest")
        ax.set(xlabel="start layer i", ylabel="end layer j (block i..j-1)", title=f"r = {r} loops")
        integer_ticks(ax.xaxis, ax.yaxis)  # layer indices: no 0.5 ticks on a small model
    unit = "accuracy" if res.metric == "acc" else "NLL drop (nats/token)"
    fig.colorbar(im, ax=list(axes[0]), label=f"Δ {unit} vs unlooped")
    fig.suptitle(f"{res.task}: {res.probe_items} probe items, unlooped {res.metric} = "
                 f"{res.base_acc if res.metric == 'acc' else res.base_nll:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(res: SearchResult, out: Path) -> tuple[Path, Path]:
    """out/search.json (every candidate, ranked) and out/heatmap.png."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "search.json"
    tmp = js.with_name(f".{js.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    os.replace(tmp, js)
    return js, heatmap(res, out / "heatmap.png")

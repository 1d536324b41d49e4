"""Block search throughput: candidates scored per minute, reuse vs recomputing every candidate.

Three ways to score the same candidates (i, j, r) and the unlooped baseline on the same probe items,
in one run, on SmolLM2-135M-Instruct (30 layers):

- search:  `looplm.retrofit_search.run` — one unlooped forward per batch keeps every layer's input;
           per candidate only loops 2..r of the core, the coda and the head run (packed items);
- naive:   what a loop over `looplm eval --core I:J --loops R` computes: for every candidate the
           model re-partitioned with core=(i, j) and every item scored by `looplm.score`;
- packed:  the search's packed rows, but every candidate's forward from scratch (no reuse): isolates
           what reusing the prelude and loop 1 buys.

Every method's log-likelihoods are checked against the naive ones. Candidates are a seeded uniform
sample of all blocks of --sizes over the model's layers (the cost of a block depends on where it
starts, so a uniform sample estimates the full grid's mean). Prints a table, then one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/retrofit_search.py --items 16 --candidates 12
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import subprocess
import time

import torch

import looplm
from looplm import retrofit_search as rs
from looplm.checkpoint import with_loops
from looplm.evaluation.tasks import load_task


def naive(model, items: list[rs.Encoded], cands: list[rs.Candidate | None], batch_items: int) -> dict:
    """Each candidate from scratch through looplm.score, batch_items items per call (like the eval runner)."""
    out = {}
    for c in cands:
        view = copy.copy(model)
        if c is not None:
            view.config = with_loops(model.config, core=(c.start, c.end))
        res = {}
        for k in range(0, len(items), batch_items):
            batch = items[k : k + batch_items]
            totals = looplm.score(view, [it.context for it in batch for _ in it.choices],
                                  [ch for it in batch for ch in it.choices], num_loops=1 if c is None else c.loops).totals
            at = 0
            for it in batch:
                res[it.id] = totals[at : at + len(it.choices)]
                at += len(it.choices)
        out[rs.BASE if c is None else c.key] = res
    return out


@torch.inference_mode()
def packed_from_scratch(model, items: list[rs.Encoded], cands: list[rs.Candidate | None], batch_items: int) -> dict:
    """The search's packed rows and head, but each candidate's full forward: prelude, r loops, coda."""
    width = max(it.length for it in items)
    out: dict = {}
    for g in rs.batches(items, batch_items):
        p = rs.pack(g, width=width)
        ctx = rs._context(model, p)
        for c in cands:
            x = model.embed_tokens(p.ids)
            i, j, r = (0, 0, 1) if c is None else (c.start, c.end, c.loops)
            for layer_idx in range(i):
                x = model.layers[layer_idx](x, ctx, layer_idx, 0)
            for loop_idx in range(r):
                for layer_idx in range(i, j):
                    x = model.layers[layer_idx](x, ctx, layer_idx, loop_idx)
            key = rs.BASE if c is None else c.key
            out.setdefault(key, {}).update(rs._split(p, rs.choice_logliks(model, p, x, ctx, j)))
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for key in b for iid in b[key] for x, y in zip(a[key][iid], b[key][iid]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16, help="ARC-Easy probe items")
    ap.add_argument("--candidates", type=int, default=12, help="candidates sampled from the grid")
    ap.add_argument("--sizes", default="1-8")
    ap.add_argument("--loops", default="2")
    ap.add_argument("--batch-items", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    path = looplm.default_model_dir()
    model, tok = looplm.load(path), looplm.load_tokenizer(path)
    N = model.config.num_layers
    grid = rs.make_candidates(N, sizes=rs.parse_ints(args.sizes, what="--sizes"),
                              loops=rs.parse_ints(args.loops, what="--loops"))
    cands = sorted(random.Random(args.seed).sample(grid, min(args.candidates, len(grid))))
    items = rs.encode_items(tok, load_task("arc-easy", data_dir=args.data_dir, limit=args.items).items)
    every = [None, *cands]  # the baseline is scored by every method

    timings, results = {}, {}
    t0 = time.perf_counter()
    cache = rs.ResultCache(None, {})
    rs.run(model, items, cands, cache, batch_size=args.batch_items, progress=False)
    timings["search (reuse)"], results["search (reuse)"] = time.perf_counter() - t0, cache.results
    t0 = time.perf_counter()
    results["packed, no reuse"] = packed_from_scratch(model, items, every, args.batch_items)
    timings["packed, no reuse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["naive (looplm.score)"] = naive(model, items, every, args.batch_items)
    timings["naive (looplm.score)"] = time.perf_counter() - t0

    ref = results["naive (looplm.score)"]
    per_min = {k: 60 * len(cands) / s for k, s in timings.items()}
    base_rate = per_min["naive (looplm.score)"]
    print(f"SmolLM2-135M ({N} layers), {len(cands)} of {len(grid)} candidates (sizes {args.sizes}, loops {args.loops}) "
          f"+ baseline, {len(items)} ARC-Easy items, {torch.get_num_threads()} thread(s), fp32\n")
    print("| method | seconds | candidates / min | × naive | max |Δ loglik| vs naive |")
    print("|---|---|---|---|---|")
    for k, s in timings.items():
        print(f"| {k} | {s:.1f} | {per_min[k]:.1f} | {per_min[k] / base_rate:.2f} | {max_diff(results[k], ref):.1e} |")
    # the cost model behind the ratio: layer passes per token, per candidate (i, j, r), k = j - i
    layers_naive = sum(N + (c.end - c.start) * (c.loops - 1) for c in cands)
    layers_reuse = sum((c.end - c.start) * (c.loops - 1) + N - c.end for c in cands)
    print(f"\nlayer passes per token over these candidates: naive {layers_naive}, reuse {layers_reuse} "
          f"(bound on the reuse ratio without the head: {layers_naive / layers_reuse:.2f}×)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "benchmark": "retrofit_search", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": "float32", "commit": commit,
        "config": {"model": "SmolLM2-135M-Instruct", "layers": N, "sizes": args.sizes, "loops": args.loops,
                   "grid": len(grid), "candidates": [c.key for c in cands], "items": len(items),
                   "batch_items": args.batch_items, "seed": args.seed},
        "seconds": {k: round(s, 2) for k, s in timings.items()},
        "candidates_per_min": {k: round(v, 2) for k, v in per_min.items()},
        "speedup_vs_naive": round(per_min["search (reuse)"] / base_rate, 3),
        "speedup_vs_packed_no_reuse": round(per_min["search (reuse)"] / per_min["packed, no reuse"], 3),
        "layer_pass_bound": round(layers_naive / layers_reuse, 3),
        "max_abs_diff_vs_naive": max(max_diff(r, ref) for r in results.values()),
    }))


if __name__ == "__main__":
    main()

"""The engine (looplm.batching.Engine) against its baselines, in the same run.

1. exits — mixed exits at batch 16: a gated looped model (SmolLM2-135M, layers 1..28 looped R=4, a random
   exit gate as in benchmarks/adaptive_exit.py) decodes 16 prompts under static:R and under Q-exit
   thresholds. Speed-up = decode tokens/s over static:R's; ideal = R / mean loops; efficiency = speed-up /
   ideal (goal ≥ 0.9). Measured for the engine (loop-granular: a token that exits frees its place in the
   next core pass) and for `looplm.generate` (one fixed batch: a decode step lasts as long as its deepest row).
   Decode time counts steps with no prompt chunk in them.
2. poisson — 64 requests with Poisson arrivals, mixed budgets (static 2–4, Q-exit) and lengths: output
   tokens/s and p50/p99 latency (arrival → last token) through the engine, through sequential `generate`
   calls (one request at a time, in arrival order) and through static batching (`generate` on the requests
   waiting when the previous batch ends, one call per distinct budget, since a batch has one budget).
3. batch1 — decode tokens/s at batch 1, SmolLM2-135M unlooped (equal depth) through the engine against
   transformers' LlamaForCausalLM (greedy loop over a DynamicCache), each in --dtypes.

    python benchmarks/engine.py                       # all parts, fp32 on CPU
    python benchmarks/engine.py --parts exits --dtype bfloat16

Prints a table per part, then one JSON line (machine, commit, config, figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import looplm
from looplm.batching import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_exit import gated  # noqa: E402  (same gated model as the adaptive-exit benchmark)


def engine_decode(model, prompts, *, budget: dict, new_tokens: int, kv: str, max_loops: int) -> dict:
    """Run prompts through a fresh engine; decode tok/s over steps without a prompt chunk."""
    engine = Engine(model, kv=kv, max_loops=max_loops, max_batch_size=len(prompts), max_step_tokens=4096)
    for p in prompts:
        engine.add_request(p, max_new_tokens=new_tokens, stop_tokens=[], **budget)
    decode_s, decode_tokens, loops = 0.0, 0, []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if all(r.prefilled == len(r.prompt) for r in engine.running) and engine.num_steps > max_loops:
            decode_s += dt
            decode_tokens += sum(len(o.new_tokens) for o in outs)
        for o in outs:
            loops += o.loops
    return {"tok_s": decode_tokens / decode_s, "mean_loops": statistics.mean(loops),
            "core_evals": engine.decode_core_layer_evals}


def generate_decode(model, prompts, *, budget: dict, new_tokens: int, kv: str) -> dict:
    res = looplm.generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=[], kv=kv, **budget)
    return {"tok_s": res.decode_tokens_per_second, "mean_loops": float(res.loops_per_token.float().mean()),
            "core_evals": res.decode_core_layer_evals}


def part_exits(args, model, R) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    budgets = [("static", {"num_loops": R})] + [(f"q:{q}", {"exit": f"q:{q}"}) for q in args.q.split(",")]
    runners = {"engine": lambda b, n: engine_decode(model, prompts, budget=b, new_tokens=n, kv=args.kv, max_loops=R),
               "generate": lambda b, n: generate_decode(model, prompts, budget=b, new_tokens=n, kv=args.kv)}
    for run in runners.values():  # warm-up
        run(budgets[0][1], 3)
    samples = {(w, name): [] for w in runners for name, _ in budgets}
    for _ in range(args.repeats):  # interleaved, so drift hits every configuration alike
        for w, run in runners.items():
            for name, b in budgets:
                samples[(w, name)].append(run(b, args.new_tokens))
    figures = []
    print(f"\n[exits] batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, kv={args.kv}, "
          f"median of {args.repeats}")
    print(f"{'runner':<9} {'budget':<8} {'mean loops':>10} {'decode tok/s':>12} {'speed-up':>9} {'ideal':>7} "
          f"{'efficiency':>10}")
    for w in runners:
        base = statistics.median(s["tok_s"] for s in samples[(w, "static")])
        for name, _ in budgets:
            tok_s = statistics.median(s["tok_s"] for s in samples[(w, name)])
            loops = samples[(w, name)][0]["mean_loops"]
            speedup, ideal = tok_s / base, R / loops
            figures.append(dict(part="exits", runner=w, budget=name, mean_loops=loops, tok_s=tok_s, speedup=speedup,
                                ideal=ideal, efficiency=speedup / ideal))
            print(f"{w:<9} {name:<8} {loops:>10.2f} {tok_s:>12.1f} {speedup:>8.2f}x {ideal:>6.2f}x "
                  f"{speedup / ideal:>10.2f}")
    return figures


def poisson_requests(args, vocab: int, R: int) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed + 1)
    budgets = [{"num_loops": 2}, {"num_loops": 3}, {"num_loops": R}, {"exit": "q:0.5"}, {"exit": "q:0.3"}]
    t, reqs = 0.0, []
    for i in range(args.requests):
        t += float(torch.empty(1).exponential_(args.rate, generator=g))
        n = int(torch.randint(8, 65, (), generator=g))
        reqs.append(dict(arrival=t, prompt=torch.randint(0, vocab, (n,), generator=g).tolist(),
                         new=int(torch.randint(8, 33, (), generator=g)), budget=budgets[i % len(budgets)]))
    return reqs


def serve_engine(model, reqs, *, kv, R) -> list[tuple[float, int]]:
    """(latency, tokens) per request, requests entering when their arrival time has passed."""
    engine = Engine(model, kv=kv, max_loops=R, max_batch_size=32, max_step_tokens=256)
    start, pending, ids, done = time.perf_counter(), list(range(len(reqs))), {}, {}
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and reqs[pending[0]]["arrival"] <= now:
            r = reqs[pending.pop(0)]
            ids[engine.add_request(r["prompt"], max_new_tokens=r["new"], stop_tokens=[], **r["budget"])] = r
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[pending[0]]["arrival"] - now))
            continue
        for o in engine.step():
            if o.finished:
                r = ids[o.request_id]
                done[id(r)] = (time.perf_counter() - start - r["arrival"], r["new"])
    return [done[id(r)] for r in reqs]


def serve_sequential(model, reqs, *, kv) -> list[tuple[float, int]]:
    start, out = time.perf_counter(), []
    for r in reqs:
        time.sleep(max(0.0, r["arrival"] - (time.perf_counter() - start)))
        looplm.generate(model, [r["prompt"]], max_new_tokens=r["new"], stop_tokens=[], kv=kv, **r["budget"])
        out.append((time.perf_counter() - start - r["arrival"], r["new"]))
    return out


def serve_static(model, reqs, *, kv, max_batch=16) -> list[tuple[float, int]]:
    """Static batching: when idle, take what has arrived (≤ max_batch), one generate call per budget."""
    start, i, out = time.perf_counter(), 0, {}
    while i < len(reqs):
        time.sleep(max(0.0, reqs[i]["arrival"] - (time.perf_counter() - start)))
        now = time.perf_counter() - start
        batch = [r for r in reqs[i : i + max_batch] if r["arrival"] <= now]
        i += len(batch)
        groups: dict[str, list[dict]] = {}
        for r in batch:
            groups.setdefault(json.dumps(r["budget"], sort_keys=True), []).append(r)
        for group in groups.values():
            looplm.generate(model, [r["prompt"] for r in group], max_new_tokens=max(r["new"] for r in group),
                            stop_tokens=[], kv=kv, **group[0]["budget"])
            t = time.perf_counter() - start
            for r in group:
                out[id(r)] = (t - r["arrival"], r["new"])
    return [out[id(r)] for r in reqs]


def part_poisson(args, model, R) -> list[dict]:
    reqs = poisson_requests(args, model.config.vocab_size, R)
    runs = {"engine": lambda: serve_engine(model, reqs, kv=args.kv, R=R),
            "static batching": lambda: serve_static(model, reqs, kv=args.kv),
            "sequential": lambda: serve_sequential(model, reqs, kv=args.kv)}
    figures = []
    print(f"\n[poisson] {args.requests} requests, rate {args.rate}/s, prompts 8–64, 8–32 new tokens, kv={args.kv}")
    print(f"{'runner':<16} {'wall s':>7} {'out tok/s':>10} {'p50 lat s':>10} {'p99 lat s':>10}")
    for name, run in runs.items():
        t0 = time.perf_counter()
        res = run()
        wall = time.perf_counter() - t0
        lat = sorted(x for x, _ in res)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        tok_s = sum(n for _, n in res) / wall
        figures.append(dict(part="poisson", runner=name, wall_s=wall, tok_s=tok_s, p50_s=p50, p99_s=p99))
        print(f"{name:<16} {wall:>7.1f} {tok_s:>10.1f} {p50:>10.2f} {p99:>10.2f}")
    seq = next(f for f in figures if f["runner"] == "sequential")["tok_s"]
    for f in figures:
        f["vs_sequential"] = f["tok_s"] / seq
    print("engine / sequential throughput: "
          f"{next(f for f in figures if f['runner'] == 'engine')['vs_sequential']:.2f}x")
    return figures


def part_batch1(args, path: str) -> list[dict]:
    from transformers import AutoModelForCausalLM, DynamicCache

    figures = []
    print(f"\n[batch1] SmolLM2-135M unlooped, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"{'dtype':<9} {'looplm engine tok/s':>19} {'transformers tok/s':>18} {'ratio':>6}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = looplm.load(path, dtype=dtype)  # an HF dir without a core: the plain model, one loop
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()

        def ours() -> float:
            r = engine_decode(model, [prompt], budget={"num_loops": 1}, new_tokens=args.new_tokens, kv="last",
                              max_loops=1)
            return r["tok_s"]

        @torch.inference_mode()
        def theirs() -> float:
            cache = DynamicCache()
            ids = torch.tensor([prompt])
            out = hf(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = hf(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return (args.new_tokens - 1) / (time.perf_counter() - t0)

        ours(), theirs()  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a.append(ours())
            b.append(theirs())
        ta, tb = statistics.median(a), statistics.median(b)
        figures.append(dict(part="batch1", dtype=dtype_name, looplm_tok_s=ta, transformers_tok_s=tb, ratio=ta / tb))
        print(f"{dtype_name:<9} {ta:>19.1f} {tb:>18.1f} {ta / tb:>5.2f}x")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="exits,poisson,batch1")
    ap.add_argument("--model", default=None, help="HF Llama-family dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--core", default="1:29")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--kv", default="last")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--q", default="0.5,0.3,0.2", help="Q-exit thresholds of part exits")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="part batch1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    path = args.model or str(looplm.default_model_dir())
    parts = args.parts.split(",")
    i, j = (int(x) for x in args.core.split(":"))
    R = args.loops
    figures = []
    if "exits" in parts or "poisson" in parts:
        model = gated(path, (i, j), R, getattr(torch, args.dtype), "cpu", args.seed)
        print(f"model {path}: core {i}:{j} x R={R}, random exit gate, {args.dtype}, {torch.get_num_threads()} threads")
        if "exits" in parts:
            figures += part_exits(args, model, R)
        if "poisson" in parts:
            figures += part_poisson(args, model, R)
    if "batch1" in parts:
        figures += part_batch1(args, path)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    print(json.dumps({"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                      "commit": commit, "config": {**vars(args), "model": path}, "figures": figures}))


if __name__ == "__main__":
    main()

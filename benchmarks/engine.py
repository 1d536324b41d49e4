"""The engine (looplm.batching.Engine) against its baselines, in the same run.

1. exits — mixed exits at batch 16: a gated looped model (SmolLM2-135M, layers 1..28 looped R=4, a random
   exit gate as in benchmarks/adaptive_exit.py) generates for 32 short prompts under static:R and under
   Q-exit thresholds, through an engine of 16 rows (the queue keeps them full) and through `generate` in
   2 batches of 16. Speed-up = output tokens/s over the same runner's static:R in the same repeat (median
   over --repeats). Ideal core = R / mean loops (the issue's measure); ideal = MACs per token of static:R over the policy's, counting what every token
   pays once (prelude, coda and the head: SmolLM2's head alone costs 8 layers). Efficiency = speed-up / ideal.
   Rows `decode` count only the engine's steps that start with all 16 rows busy decoding, no prompt chunk
   among them (the steady state of a server, and what `generate`'s decode tokens/s measured when the issue
   was filed), with the mean loops of the tokens those steps emit. The whole-run figures also hold each
   prompt's prefill, which runs every loop whatever the policy, and the drain at the end, when the last
   requests run in a half-empty batch.
2. poisson — 64 requests with Poisson arrivals, mixed budgets (static 2–4, Q-exit) and lengths: output
   tokens/s and p50/p99 latency (arrival → last token) through the engine, through sequential `generate`
   calls (one request at a time, in arrival order) and through static batching (`generate` on the requests
   waiting when the previous batch ends, one call per distinct budget, since a batch has one budget).
3. batch1 — decode tokens/s at batch 1, SmolLM2-135M unlooped (equal depth) through the engine against
   transformers' LlamaForCausalLM (greedy loop over a DynamicCache), each in --dtypes.
4. steps (not in the default parts) — the decode steady state of part exits measured more finely: an engine
   under static:R and one under a Q-exit, 16 rows each, stepped in turn in one process so that the machine's
   drift hits both alike; the efficiency as in part exits, and each step's parts (core pass, readout = coda,
   norm and head, prelude, the rest) in ms.
5. matmul (not in the default parts) — every projection of the model through `F.linear` against the
   oneDNN-packed weights the engine uses (`looplm.fused`), at 1, 4, 16 and 256 rows.

    python benchmarks/engine.py                       # all parts, fp32 on CPU
    python benchmarks/engine.py --parts steps         # exits at batch 16, stepped in turn with static:R
    python benchmarks/engine.py --parts exits --dtype bfloat16
    python benchmarks/engine.py --device cuda --dtypes bfloat16 --dtype bfloat16   # on a GPU: batch 1 also
                                                      # prints the fraction of the memory bandwidth it reaches

Prints a table per part, then one JSON line (machine, commit, config, figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import looplm
from looplm.batching import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_exit import gated  # noqa: E402  (same gated model as the adaptive-exit benchmark)
from common import clock, print_result  # noqa: E402


def layer_macs(model) -> tuple[int, int]:
    """(MACs per token of one core loop, MACs per token paid once: embedding-free prelude, coda and head)."""
    def params(mods):
        return sum(p.numel() for m in mods for n, p in m.named_parameters() if p.dim() == 2)
    core = params(model.core)
    fixed = params(model.prelude) + params(model.coda) + model.lm_head.weight.numel()
    return core, fixed


def engine_run(model, prompts, *, budget: dict, new_tokens: int, kv: str, max_loops: int, batch: int) -> dict:
    """All prompts through one engine of `batch` rows (the queue keeps the rows full); output tokens/s over
    the whole run, and over the decode steady state: the steps that start with every row busy and no prompt
    chunk among them (`decode`; what `generate`'s decode tokens/s measured when the issue was filed). Its
    mean loops are those of the tokens those steps emit."""
    engine = Engine(model, kv=kv, max_loops=max_loops, max_batch_size=batch, max_step_tokens=4096)
    for p in prompts:
        engine.add_request(p, max_new_tokens=new_tokens, stop_tokens=[], **budget)
    loops, dec_loops, dec_s, t0 = [], [], 0.0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine._admit()  # what step() does first; here to see what the step will hold
        decode = len(engine.running) == batch and not any(r.prefilling for r in engine.running)
        t1 = time.perf_counter()
        outs = engine.step()
        if decode:
            dec_s += time.perf_counter() - t1
            for o in outs:
                dec_loops += o.loops
        for o in outs:
            loops += o.loops
    wall = time.perf_counter() - t0
    return {"tok_s": len(loops) / wall, "mean_loops": statistics.mean(loops),
            "decode_tok_s": len(dec_loops) / dec_s if dec_s else float("nan"),
            "decode_mean_loops": statistics.mean(dec_loops) if dec_loops else float("nan")}


def generate_run(model, prompts, *, budget: dict, new_tokens: int, kv: str, batch: int) -> dict:
    """The same prompts through `generate`, `batch` at a time (static batching)."""
    loops, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        res = looplm.generate(model, prompts[i : i + batch], max_new_tokens=new_tokens, stop_tokens=[], kv=kv,
                              **budget)
        loops += res.loops_per_token.flatten().tolist()
    wall = time.perf_counter() - t0
    return {"tok_s": len(loops) / wall, "mean_loops": statistics.mean(loops)}


def part_exits(args, model, R) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch * args.waves
    prompts = torch.randint(0, model.config.vocab_size, (n, args.prompt_len), generator=g).tolist()
    budgets = [("static", {"num_loops": R})] + [(f"q:{q}", {"exit": f"q:{q}"}) for q in args.q.split(",")]
    kw = dict(new_tokens=args.new_tokens, kv=args.kv, batch=args.batch)
    runners = {"engine": lambda b, p=prompts, **k: engine_run(model, p, budget=b, max_loops=R, **{**kw, **k}),
               "generate": lambda b, p=prompts, **k: generate_run(model, p, budget=b, **{**kw, **k})}
    runners = {w: r for w, r in runners.items() if w in args.runners.split(",")}
    for run in runners.values():  # warm-up
        run(budgets[0][1], p=prompts[: args.batch], new_tokens=3)
    samples = {(w, name): [] for w in runners for name, _ in budgets}
    for _ in range(args.repeats):  # interleaved, so drift hits every configuration alike
        for w, run in runners.items():
            for name, b in budgets:
                samples[(w, name)].append(run(b))
                print(f"  {w} {name}: {samples[(w, name)][-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    core, fixed = layer_macs(model)
    figures = []
    print(f"\n[exits] {n} requests through {args.batch} rows (engine: continuous; generate: {args.waves} batches), "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, kv={args.kv}, median of {args.repeats}")
    print("ideal core = R / mean loops; ideal = MACs per token of static:R / of the policy (prelude, coda and head "
          f"included: {fixed / 1e6:.0f}M fixed + {core / 1e6:.0f}M per loop)")
    print(f"{'runner':<9} {'budget':<8} {'mean loops':>10} {'out tok/s':>10} {'speed-up':>9} {'ideal core':>10} "
          f"{'eff core':>8} {'ideal':>6} {'eff':>5}")
    def rows(label: str, w: str, key: str) -> None:
        """One table row and figure per budget: `key` tok/s of runner w against its static:R."""
        statics = [s[key] for s in samples[(w, "static")]]
        for name, _ in budgets:
            tok_s = statistics.median(s[key] for s in samples[(w, name)])
            loops = samples[(w, name)][0]["decode_mean_loops" if key == "decode_tok_s" else "mean_loops"]
            # each repeat against the static:R run of the same repeat (the machine drifts between repeats)
            speedup = statistics.median(s[key] / b for s, b in zip(samples[(w, name)], statics))
            ideal_core = R / loops
            ideal = (fixed + core * R) / (fixed + core * loops)
            figures.append(dict(part="exits", runner=w if key == "tok_s" else f"{w} (decode)", budget=name, mean_loops=loops, tok_s=tok_s,
                                speedup=speedup, ideal_core=ideal_core, efficiency_core=speedup / ideal_core,
                                ideal=ideal, efficiency=speedup / ideal))
            print(f"{label:<9} {name:<8} {loops:>10.2f} {tok_s:>10.1f} "
                  f"{speedup:>8.2f}x {ideal_core:>9.2f}x {speedup / ideal_core:>8.2f} {ideal:>5.2f}x "
                  f"{speedup / ideal:>5.2f}")

    for w in runners:
        rows(w, w, "tok_s")
        if w == "engine":  # the decode steady state: every row busy, no prompt chunk in the step
            rows("  decode", w, "decode_tok_s")
    return figures


def poisson_requests(args, vocab: int, R: int) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed + 1)
    budgets = [{"num_loops": 2}, {"num_loops": 3}, {"num_loops": R}, {"exit": "q:0.5"}, {"exit": "q:0.3"}]
    t, reqs = 0.0, []
    for i in range(args.requests):
        t += float(torch.empty(1).exponential_(args.rate, generator=g))
        n = int(torch.randint(8, 33, (), generator=g))
        reqs.append(dict(arrival=t, prompt=torch.randint(0, vocab, (n,), generator=g).tolist(),
                         new=int(torch.randint(8, 25, (), generator=g)), budget=budgets[i % len(budgets)]))
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


def part_steps(args, model, R) -> list[dict]:
    """Two engines of `batch` rows, static:R and a Q-exit, stepped in turn in this process (drift hits both
    alike), --steps steps each after 8 of warm-up; efficiency = (tok/s ratio) / (R / mean loops). The step's
    parts are timed by wrapping the model's embed (prelude), core_loop and readout (coda, norm, head)."""
    import collections
    import contextlib

    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    spent: collections.Counter = collections.Counter()
    who = ["static"]

    @contextlib.contextmanager
    def timed():
        wrapped = {}
        for name in ("embed", "core_loop", "readout"):
            f = getattr(model, name)
            wrapped[name] = f

            def w(*a, _f=f, _n=name, **k):
                t = time.perf_counter()
                out = _f(*a, **k)
                spent[(who[0], _n)] += time.perf_counter() - t
                return out
            setattr(model, name, w)
        try:
            yield
        finally:
            for name in wrapped:
                delattr(model, name)  # back to the class's methods

    figures = []
    print(f"\n[steps] static:{R} and each Q-exit, {args.batch} rows each, stepped in turn, {args.steps} steps each; "
          "ms per step")
    print(f"{'budget':<8} {'mean loops':>10} {'speed-up':>9} {'ideal core':>10} {'eff core':>8} "
          f"{'core':>7} {'readout':>8} {'prelude':>8} {'rest':>7} {'static: core':>13} {'readout':>8} {'prelude':>8} "
          f"{'rest':>7}")
    for q in args.q.split(","):
        name = f"q:{q}"
        engines = {}
        for label, budget in (("static", {"num_loops": R}), (name, {"exit": name})):
            e = Engine(model, kv=args.kv, max_loops=R, max_batch_size=args.batch, max_step_tokens=4096)
            for p in prompts:
                e.add_request(p, max_new_tokens=args.steps + 16, stop_tokens=[], **budget)
            for _ in range(8):
                e.step()
            engines[label] = e
        spent.clear()
        tokens, loops = collections.Counter(), []
        with timed():
            for _ in range(args.steps):
                for label, e in engines.items():
                    who[0] = label
                    t = time.perf_counter()
                    outs = e.step()
                    spent[(label, "step")] += time.perf_counter() - t
                    tokens[label] += len(outs)
                    if label == name:
                        loops += [n for o in outs for n in o.loops]
        ms = {(lbl, part): 1e3 * spent[(lbl, part)] / args.steps for lbl in engines
              for part in ("step", "core_loop", "readout", "embed")}
        rest = {lbl: ms[(lbl, "step")] - ms[(lbl, "core_loop")] - ms[(lbl, "readout")] - ms[(lbl, "embed")]
                for lbl in engines}
        if not tokens["static"] or not loops:
            raise SystemExit(f"--steps {args.steps}: too few steps for a token of each engine; use ≥ {4 * R}")
        mean = statistics.mean(loops)
        speedup = (tokens[name] / spent[(name, "step")]) / (tokens["static"] / spent[("static", "step")])
        eff = speedup / (R / mean)
        figures.append(dict(part="steps", budget=name, mean_loops=mean, speedup=speedup, ideal_core=R / mean,
                            efficiency_core=eff, ms={f"{lbl} {part}": v for (lbl, part), v in ms.items()}))
        print(f"{name:<8} {mean:>10.2f} {speedup:>8.2f}x {R / mean:>9.2f}x {eff:>8.2f} "
              f"{ms[(name, 'core_loop')]:>7.1f} {ms[(name, 'readout')]:>8.1f} {ms[(name, 'embed')]:>8.1f} "
              f"{rest[name]:>7.1f} {ms[('static', 'core_loop')]:>13.1f} {ms[('static', 'readout')]:>8.1f} "
              f"{ms[('static', 'embed')]:>8.1f} {rest['static']:>7.1f}")
    return figures


def part_poisson(args, model, R) -> list[dict]:
    reqs = poisson_requests(args, model.config.vocab_size, R)
    runs = {"engine": lambda: serve_engine(model, reqs, kv=args.kv, R=R),
            "static batching": lambda: serve_static(model, reqs, kv=args.kv),
            "sequential": lambda: serve_sequential(model, reqs, kv=args.kv)}
    figures = []
    print(f"\n[poisson] {args.requests} requests, rate {args.rate}/s, prompts 8–32, 8–24 new tokens, kv={args.kv}")
    print(f"{'runner':<16} {'wall s':>7} {'out tok/s':>10} {'p50 lat s':>10} {'p99 lat s':>10}")
    for name, run in runs.items():
        print(f"  {name} ...", file=sys.stderr, flush=True)
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


PEAK_GBPS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
             "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "A10G": 600.0}
"""Memory bandwidth of the accelerators these benchmarks have run on, GB/s (the vendors' data sheets); the
first name contained in `torch.cuda.get_device_name()` counts. --peak-gbps overrides it."""


def peak_gbps(args) -> float | None:
    if args.peak_gbps is not None:
        return args.peak_gbps
    if torch.device(args.device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(args.device))
        return next((v for k, v in PEAK_GBPS.items() if k in name), None)
    return None


def part_batch1(args, path: str) -> list[dict]:
    """Decode tokens/s at batch 1, and the bytes of weights that each token reads (all of them, the tied head
    once) × tokens/s: the memory bandwidth a decode step reaches, and its fraction of the device's peak."""
    from transformers import AutoModelForCausalLM, DynamicCache

    figures, peak, dev = [], peak_gbps(args), args.device
    print(f"\n[batch1] SmolLM2-135M unlooped on {dev}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}" + (f"; peak bandwidth {peak:.0f} GB/s" if peak else ""))
    print(f"{'dtype':<9} {'looplm engine tok/s':>19} {'transformers tok/s':>18} {'ratio':>6} {'GB/s':>7} "
          f"{'GB/s hf':>7}" + (f" {'of peak':>7}" if peak else ""))
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = looplm.load(path, dtype=dtype, device=dev)  # an HF dir without a core: the plain model, one loop
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()

        def ours() -> float:
            engine = Engine(model, kv="last", max_loops=1, max_batch_size=1)
            engine.add_request(prompt, max_new_tokens=args.new_tokens, stop_tokens=[], num_loops=1)
            engine.step()  # the prefill and the first token
            t0 = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()  # (its tokens come back to the host: a sync per step)
            return (args.new_tokens - 1) / (time.perf_counter() - t0)

        @torch.inference_mode()
        def theirs() -> float:
            cache = DynamicCache()
            ids = torch.tensor([prompt], device=dev)
            out = hf(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = clock(dev)
            for _ in range(args.new_tokens - 1):
                out = hf(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return (args.new_tokens - 1) / (clock(dev) - t0)

        ours(), theirs()  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a.append(ours())
            b.append(theirs())
        ta, tb = statistics.median(a), statistics.median(b)
        gb = model.weight_bytes() / 1e9
        fig = dict(part="batch1", device=dev, dtype=dtype_name, looplm_tok_s=ta, transformers_tok_s=tb,
                   ratio=ta / tb, weight_gb=gb, gbps=ta * gb, transformers_gbps=tb * gb)
        line = f"{dtype_name:<9} {ta:>19.1f} {tb:>18.1f} {ta / tb:>5.2f}x {ta * gb:>7.1f} {tb * gb:>7.1f}"
        if peak:
            fig.update(peak_gbps=peak, fraction_of_peak=ta * gb / peak)
            line += f" {ta * gb / peak:>7.1%}"
        figures.append(fig)
        print(line)
    return figures


def part_matmul(args, path: str) -> list[dict]:
    """Every projection of the model (q|k|v and gate|up fused, o, down, the head) for a few row counts: `F.linear`
    on the checkpoint's layout against oneDNN-packed weights (`looplm.fused`), alternated, median of --repeats."""
    import torch.nn.functional as F

    from looplm.fused import Projection, can_pack

    model = looplm.load(path, dtype=torch.float32)
    if not can_pack("cpu", torch.float32):
        print("\n[matmul] oneDNN cannot pack fp32 here: skipped")
        return []
    groups = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        groups += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
    groups.append([model.lm_head])
    dense = [(torch.cat([lin.weight.detach() for lin in g]), g[0].in_features) for g in groups]
    packed = [Projection(g, pack=True) for g in groups]
    print(f"\n[matmul] {len(groups)} projections of {path} (fp32, {torch.get_num_threads()} threads), ms per pass over all, "
          f"median of {args.repeats}")
    print(f"{'rows':>5} {'F.linear':>9} {'packed':>8} {'ratio':>6}")
    figures = []
    with torch.inference_mode():
        for rows in (1, 4, 16, 256):
            xs = {d: torch.randn(1, rows, d) for d in {d for _, d in dense}}
            def lin() -> float:
                t0 = time.perf_counter()
                for w, d in dense:
                    F.linear(xs[d], w)
                return time.perf_counter() - t0
            def pk() -> float:
                t0 = time.perf_counter()
                for p, (_, d) in zip(packed, dense):
                    p(xs[d])
                return time.perf_counter() - t0
            lin(), pk()  # warm-up
            a, b = [], []
            for _ in range(max(3, args.repeats)):
                a.append(lin())
                b.append(pk())
            ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            figures.append(dict(part="matmul", rows=rows, linear_ms=ta, packed_ms=tb, ratio=ta / tb))
            print(f"{rows:>5} {ta:>9.1f} {tb:>8.1f} {ta / tb:>5.2f}x")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="exits,poisson,batch1")
    ap.add_argument("--model", default=None, help="HF Llama-family dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--core", default="1:29")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--kv", default="last")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--waves", type=int, default=2, help="part exits: requests = batch × waves")
    ap.add_argument("--runners", default="engine,generate", help="part exits: engine and/or generate")
    ap.add_argument("--q", default="0.7,0.6,0.5", help="Q-exit thresholds of part exits")
    ap.add_argument("--prompt-len", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="part steps: steps timed per engine")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="part batch1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="part batch1: the device's memory bandwidth (default: a table of GPUs; none on CPU)")
    args = ap.parse_args()

    path = args.model or str(looplm.default_model_dir())
    parts = args.parts.split(",")
    i, j = (int(x) for x in args.core.split(":"))
    R = args.loops
    figures = []
    if "exits" in parts or "poisson" in parts or "steps" in parts:
        model = gated(path, (i, j), R, getattr(torch, args.dtype), args.device, args.seed)
        print(f"model {path}: core {i}:{j} x R={R}, random exit gate, {args.dtype} on {args.device}, "
              f"{torch.get_num_threads()} threads")
        if "exits" in parts:
            figures += part_exits(args, model, R)
        if "poisson" in parts:
            figures += part_poisson(args, model, R)
        if "steps" in parts:
            figures += part_steps(args, model, R)
    if "batch1" in parts:
        figures += part_batch1(args, path)
    if "matmul" in parts:
        figures += part_matmul(args, path)
    print_result({**vars(args), "model": path}, figures)


if __name__ == "__main__":
    main()

"""Decode speed with real per-token exits: does the wall time track the loops?

A gated looped model (SmolLM2-135M weights, layers I..J-1 looped R times, and an exit gate) decodes the
same prompts under static:R (the baseline, same run) and under Q-exit thresholds that bring the mean
loop count from R down to 1. Rows whose policy fires leave the loop (the engine gathers the rows still
looping), so the saving should show in tokens/s.

Speed-up is decode tokens/s relative to static:R. Two ideals are reported: `ideal core` = R / mean loops
(if only the core cost time), and `ideal` = layer evaluations per token of static:R over those of the
policy, counting the prelude and coda layers that every token pays (+1 layer-equivalent for the head).
`efficiency` = measured speed-up / ideal. The gate's weights are drawn at random with a fixed seed, scaled
so that λ spreads over (0, 1) across tokens: this benchmark measures speed, not quality (see
benchmarks/quality_vs_compute.py for that).

    python benchmarks/adaptive_exit.py                    # core 1:29 (28 layers), R=4, batch 1 and 16
    python benchmarks/adaptive_exit.py --device cuda --dtype bfloat16

Prints a table, then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess

import torch

import looplm
from looplm.checkpoint import build


def gated(path: str, core: tuple[int, int], R: int, dtype: torch.dtype, device: str, seed: int) -> looplm.LoopedLM:
    base = looplm.load(path, core=core, num_loops=R)
    cfg = dataclasses.replace(base.config, exit_gate=True)
    tensors = dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # scale w so that w·h is O(1) for this model's hidden states
        ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)
        h = base(ids, return_loops=True).loop_hidden  # (R, 1, S, D)
        D = cfg.hidden_size
        w = torch.randn(1, D, generator=g) / (h.norm(dim=-1).mean() / 2)
        tensors["early_exit_gate.weight"] = w
        tensors["early_exit_gate.bias"] = torch.zeros(1)
    return build(cfg, tensors, where="benchmark", dtype=dtype, device=device)


def run(model, prompts, *, exit: str, new_tokens: int, device: str) -> dict:
    res = looplm.generate(model, prompts, exit=exit, max_new_tokens=new_tokens, stop_tokens=[])
    return {"tok_s": res.decode_tokens_per_second, "decode_s": res.decode_seconds,
            "mean_loops": float(res.loops_per_token[:, 1:].float().mean()),
            "core_evals": res.decode_core_layer_evals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF Llama-family dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--core", default="1:29")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--q", default="0.95,0.7,0.5,0.3,0.1,0.01", help="Q-exit thresholds")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    i, j = (int(x) for x in args.core.split(":"))
    R, dtype = args.loops, getattr(torch, args.dtype)
    path = args.model or str(looplm.default_model_dir())
    model = gated(path, (i, j), R, dtype, args.device, args.seed)
    cfg = model.config
    fixed = cfg.num_prelude_layers + cfg.num_coda_layers + 1  # + the head, as one layer-equivalent
    policies = [f"static:{R}"] + [f"q:{q}" for q in args.q.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    rows, figures = [], []
    for B in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
        run(model, prompts, exit=policies[0], new_tokens=3, device=args.device)  # warm-up
        samples = {p: [] for p in policies}
        for _ in range(args.repeats):  # interleaved, so drift hits every policy alike
            for p in policies:
                samples[p].append(run(model, prompts, exit=p, new_tokens=args.new_tokens, device=args.device))
        base = statistics.median(s["tok_s"] for s in samples[policies[0]])
        for p in policies:
            tok_s = statistics.median(s["tok_s"] for s in samples[p])
            loops = samples[p][0]["mean_loops"]  # deterministic (greedy): the same every repeat
            speedup = tok_s / base
            ideal_core = R / loops
            ideal = (fixed + cfg.num_core_layers * R) / (fixed + cfg.num_core_layers * loops)
            spread = (max(s["tok_s"] for s in samples[p]) - min(s["tok_s"] for s in samples[p])) / tok_s
            fig = dict(batch=B, policy=p, mean_loops=loops, tok_s=tok_s, speedup=speedup, ideal_core=ideal_core,
                       ideal=ideal, efficiency=speedup / ideal, spread=spread, core_evals=samples[p][0]["core_evals"])
            figures.append(fig)
            rows.append(f"{B:>5}  {p:<10}  {loops:>10.2f}  {tok_s:>12.2f}  {speedup:>8.2f}x  {ideal_core:>10.2f}x  "
                        f"{ideal:>6.2f}x  {speedup / ideal:>10.2f}  {spread:>6.0%}")
    print(f"model {path}: prelude {cfg.num_prelude_layers} + core {cfg.num_core_layers} x R={R} + coda "
          f"{cfg.num_coda_layers}, random gate; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, {args.dtype} on {args.device}")
    print(f"{'batch':>5}  {'policy':<10}  {'mean loops':>10}  {'decode tok/s':>12}  {'speed-up':>9}  "
          f"{'ideal core':>11}  {'ideal':>7}  {'efficiency':>10}  {'spread':>6}")
    print("\n".join(rows))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    print(json.dumps({
        "machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "dtype": args.dtype, "commit": commit, "config": {**vars(args), "model": path},
        "figures": figures,
    }))


if __name__ == "__main__":
    main()

"""Decode benchmark: a looped model against the same weights physically unrolled in transformers.

The looped model runs HF layers [I, J) of a checkpoint R times (prelude = layers < I, coda = layers
>= J). The baseline is a transformers `LlamaForCausalLM` with I + R*(J-I) + (N-J) layers holding the
core's weights R times in order: the same FLOPs per token. Before timing, the script asserts (fp32)
that both give the same logits, which proves they compute the same function.

Per batch size it measures, for the looped model under each KV strategy and for the baseline:
prefill time (prompt forward + first token), decode throughput (new tokens/s over the decode steps
only), weight bytes (unique parameters) and KV bytes per token of one sequence. With --device cuda it
also reports peak allocated memory and, at batch 1, the fraction of --peak-bandwidth reached by one
decode step: (weights read, the core R times, + KV read) / step time. Peak RSS is not reported on CPU:
both models live in one process, so its delta would not be attributable.

Both models are timed the same way (perf_counter, synchronised on CUDA): looped through
`looplm.stream` (= `looplm.generate`, whose own timers do not synchronise CUDA), HF through a manual
greedy loop over a DynamicCache (not `hf.generate`, whose overheads are not comparable). Prompts are
seeded random ids without padding and nothing stops early, so every run decodes --new-tokens tokens.

    python benchmarks/decode.py                                  # SmolLM2-135M, core 10:14, R=4
    python benchmarks/decode.py --device cuda --dtype bfloat16 --batch-sizes 1,8,32

Prints a table, then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import looplm
from looplm import checkpoint as ck

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock  # noqa: E402

STRATEGIES = ("per_loop", "last", "mean", "first")


def build_models(path: Path, I: int, J: int, R: int, dtype: torch.dtype, device: str):
    """(looped LoopedLM, unrolled LlamaForCausalLM) on the same weights."""
    cfg, _ = ck.read_config(path)
    N = cfg.num_prelude_layers + cfg.num_core_layers + cfg.num_coda_layers
    if not 0 <= I < J <= N:
        raise SystemExit(f"--core {I}:{J} does not fit a model of {N} layers")
    cfg = dataclasses.replace(cfg, num_prelude_layers=I, num_core_layers=J - I, num_coda_layers=N - J, num_loops=R)
    tensors = ck._to_looplm_names(ck.read_safetensors(path))
    looped = ck.build(cfg, dict(tensors), where=str(path), dtype=dtype, device=device)

    C, L = J - I, I + R * (J - I) + (N - J)
    source = [u if u < I else I + (u - I) % C if u < I + R * C else u - (R - 1) * C for u in range(L)]
    sd = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in tensors.items() if not k.startswith("layers.")}
    for u, s in enumerate(source):
        prefix = f"layers.{s}."
        sd.update({f"model.layers.{u}.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)})
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])  # tied: the embedding wins
    hf_cfg = LlamaConfig.from_pretrained(path, num_hidden_layers=L)
    hf_cfg._attn_implementation = "sdpa"  # what LoopedLM uses (F.scaled_dot_product_attention)
    hf = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    hf.load_state_dict(sd, strict=True)
    return looped, hf


def unique_bytes(module: torch.nn.Module) -> int:
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
    return sum(seen.values())


@torch.inference_mode()
def run_looped(model, ids, new_tokens: int, R: int, kv: str, device: str) -> dict:
    gen = looplm.stream(model, ids, max_new_tokens=new_tokens, num_loops=R, kv=kv, stop_tokens=[])
    t0 = clock(device)
    steps = iter(gen)
    next(steps)  # prefill + the first token
    t1 = clock(device)
    for _ in steps:
        pass
    t2 = clock(device)
    res = gen.result()
    return dict(prefill=t1 - t0, decode=t2 - t1, tokens=res.sequences[:, ids.shape[1]:], kv_bpt=res.kv_bytes_per_token)


@torch.inference_mode()
def run_hf(hf, ids, new_tokens: int, device: str) -> dict:
    cache = DynamicCache(config=hf.config)
    t0 = clock(device)
    logits = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tok = [logits.argmax(-1)]
    t1 = clock(device)
    for _ in range(new_tokens - 1):
        logits = hf(input_ids=tok[-1][:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        tok.append(logits.argmax(-1))
    t2 = clock(device)
    kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    B, T = ids.shape[0], cache.get_seq_length()
    return dict(prefill=t1 - t0, decode=t2 - t1, tokens=torch.stack(tok, 1), kv_bpt=kv // (B * T))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="HF Llama safetensors dir (default: SmolLM2-135M)")
    ap.add_argument("--core", default="10:14", help="I:J, layers I..J-1 form the looped core")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--peak-bandwidth", type=float, default=3350.0, help="GB/s (H100 SXM: 3350)")
    args = ap.parse_args()
    path = args.model or looplm.default_model_dir()
    I, J = (int(x) for x in args.core.split(":"))
    R, dev, dtype = args.loops, args.device, getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be ≥ 2 (the first token comes from prefill)")

    # equal computation, checked once in fp32: the looped model's logits = the unrolled model's
    looped, hf = build_models(path, I, J, R, torch.float32, dev)
    check = torch.randint(0, looped.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.inference_mode():
        diff = (looped(check, num_loops=R).logits - hf(input_ids=check).logits).abs().max().item()
    assert diff < 1e-4, f"looped and unrolled logits differ by {diff:.2e}"
    if dtype != torch.float32:
        del looped, hf
        looped, hf = build_models(path, I, J, R, dtype, dev)
    cfg = looped.config
    P, C, K = cfg.num_prelude_layers, cfg.num_core_layers, cfg.num_coda_layers
    core_bytes = unique_bytes(torch.nn.ModuleList(looped.core))
    w_bytes = {"looped": looped.weight_bytes(), "hf": unique_bytes(hf)}
    step_weight_bytes = w_bytes["looped"] + (R - 1) * core_bytes  # the core is read once per loop
    variants = [("looped", kv) for kv in STRATEGIES] + [("hf", "dynamic")]

    rows = []
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B)).to(dev)

        def run(name, kv, n, ids=ids):
            return run_hf(hf, ids, n, dev) if name == "hf" else run_looped(looped, ids, n, R, kv, dev)

        for name, kv in variants:  # warm-up
            run(name, kv, 2)
        times = {v: [] for v in variants}
        peak = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for v in variants:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[v].append(run(*v, args.new_tokens))
                if dev == "cuda":
                    peak[v] = torch.cuda.max_memory_allocated()
        hf_tokens = times[("hf", "dynamic")][0]["tokens"]
        for name, kv in variants:
            rs = times[(name, kv)]
            prefill, decode = statistics.median(r["prefill"] for r in rs), statistics.median(r["decode"] for r in rs)
            steps = args.new_tokens - 1
            row = dict(model=name, kv=kv, batch=B, prefill_ms=1e3 * prefill, decode_tok_s=B * steps / decode,
                       weight_bytes=w_bytes[name], kv_bytes_per_token=rs[0]["kv_bpt"],
                       tokens_match_hf=bool((rs[0]["tokens"] == hf_tokens).all()),
                       decode_spread=(max(r["decode"] for r in rs) - min(r["decode"] for r in rs)) / decode)
            if dev == "cuda":
                row["peak_mem_bytes"] = peak[(name, kv)]
                if B == 1:  # each layer-loop reads T positions of one slot, whatever the strategy keeps
                    T = args.prompt_len + steps / 2  # mean context over the decode steps
                    kv_read = T * (P + R * C + K) * 2 * cfg.num_key_value_heads * cfg.head_dim * looped.dtype.itemsize
                    row["bw_fraction"] = (step_weight_bytes + kv_read) / (decode / steps) / (args.peak_bandwidth * 1e9)
            rows.append(row)
        for row in rows[-len(variants):]:
            row["ratio_vs_hf"] = row["decode_tok_s"] / rows[-1]["decode_tok_s"]

    cols = ["model", "kv", "batch", "prefill ms", "decode tok/s", "ratio vs HF", "weights MB", "KV B/token", "= HF tok"]
    cols += ["peak MB", "BW frac"] if dev == "cuda" else []
    table = [[r["model"], r["kv"], str(r["batch"]), f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}",
              f"{r['ratio_vs_hf']:.3f}", f"{r['weight_bytes'] / 2**20:.1f}", str(r["kv_bytes_per_token"]),
              "yes" if r["tokens_match_hf"] else "no"]
             + ([f"{r['peak_mem_bytes'] / 2**20:.0f}", f"{r['bw_fraction']:.3f}" if "bw_fraction" in r else "-"]
                if dev == "cuda" else []) for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(f"looped: prelude {P} + core {C} x {R} loops + coda {K}; HF: {P + R * C + K} layers; "
          f"max |logit diff| {diff:.1e}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, {args.dtype} on {dev}")
    for line in [cols, ["-" * w for w in widths], *table]:
        print("  ".join(s.rjust(w) if i > 1 else s.ljust(w) for i, (s, w) in enumerate(zip(line, widths))))

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": str(path),
              "prelude": P, "core": C, "coda": K, "hf_layers": P + R * C + K, "max_abs_logit_diff": diff,
              "torch": torch.__version__}
    print(json.dumps({"machine": machine, "dtype": args.dtype, "commit": commit, "config": config, "figures": rows}))


if __name__ == "__main__":
    main()

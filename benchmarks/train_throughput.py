"""Training throughput of a looped model vs an unrolled model of equal FLOPs, and activation memory
with and without truncated backprop.

Looped: prelude P + core C × R loops + coda K (weights of P + C + K layers). Unrolled: P + C·R + K
unique layers run once — the same layer evaluations per token, R× the core's parameters. Both train
on the same synthetic batches with AdamW, in the same run; the looped model is timed with the
per-loop objective it is meant for (stage I: a readout and a CE at every loop) and with the last
loop's CE only (the exact-FLOPs match of the unrolled model).

Memory: bytes of tensors autograd saves for backward (a saved-tensor hook sums them: device-independent),
for R loops with gradients through all loops vs through the last k (`backprop_loops`), plus the
process's peak RSS on CPU / peak allocated on CUDA.

    python benchmarks/train_throughput.py                       # D=128, P=1, C=2, K=0, R=4, batch 32 × 64
    python benchmarks/train_throughput.py --device cuda --hidden 512 --batch 64

Prints a table, then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import time

import torch

from looplm.config import LoopConfig
from looplm.model import LoopedLM
from looplm.train.data import SyntheticSource
from looplm.train.objective import LossConfig, LoopObjective
from looplm.train.synthetic import build_tokenizer


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward during fn() (each storage counted once)."""
    seen, total = set(), 0

    def pack(t: torch.Tensor):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


def peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_steps(obj: LoopObjective, src: SyntheticSource, *, R: int, no_grad: int, batch: int, steps: int,
               device: str) -> float:
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        b = src.batch(step, batch)
        ids, labels = b.input_ids.to(device), b.labels.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = obj(ids, labels, num_loops=R, no_grad_loops=no_grad)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return batch * src.seq_len / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--prelude", type=int, default=1)
    ap.add_argument("--core", type=int, default=2)
    ap.add_argument("--coda", type=int, default=0)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--deep-loops", type=int, default=8, help="R for the truncated-backprop memory rows")
    ap.add_argument("--backprop-loops", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = build_tokenizer()
    src = SyntheticSource(tok, task="chain", difficulties=[1, 2, 3, 4], seq_len=args.seq_len, seed=0)
    P, C, K, R, D = args.prelude, args.core, args.coda, args.loops, args.hidden
    base = LoopConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=4 * D, num_attention_heads=max(1, D // 32),
                      num_key_value_heads=max(1, D // 32), num_prelude_layers=P, num_core_layers=C, num_coda_layers=K,
                      num_loops=R, max_position_embeddings=max(256, args.seq_len), norm_style="sandwich", loop_norm=True,
                      exit_gate=True)
    unrolled_cfg = dataclasses.replace(base, num_core_layers=C * R, num_loops=1, exit_gate=False)

    def build(cfg: LoopConfig) -> LoopedLM:
        return LoopedLM(cfg).to(args.device).train()

    rows = []
    looped = build(base)
    unrolled = build(unrolled_cfg)
    configs = [
        ("unrolled (baseline)", LoopObjective(unrolled, LossConfig(stage="per_loop")), 1, 0, unrolled),
        ("looped, last-loop CE", LoopObjective(looped, LossConfig(stage="per_loop", last_loop_only=True)), R, 0, looped),
        ("looped, stage I", LoopObjective(looped, LossConfig(stage="stage1")), R, 0, looped),
    ]
    for name, obj, r, ng, m in configs:
        tps = time_steps(obj, src, R=r, no_grad=ng, batch=args.batch, steps=args.steps, device=args.device)
        params = sum(p.numel() for p in m.parameters())
        rows.append({"name": name, "loops": r, "params": params, "tokens_per_s": round(tps, 1)})
    base_tps = rows[0]["tokens_per_s"]
    for row in rows:
        row["speed_vs_unrolled"] = round(row["tokens_per_s"] / base_tps, 3)

    b = src.batch(0, args.batch)
    ids, labels = b.input_ids.to(args.device), b.labels.to(args.device)
    mem = []
    Rd, k = args.deep_loops, args.backprop_loops
    obj = LoopObjective(looped, LossConfig(stage="per_loop"))
    for name, ng in ((f"R={Rd}, backprop through all loops", 0), (f"R={Rd}, backprop through the last {k}", Rd - k)):
        nbytes = saved_bytes(lambda: obj(ids, labels, num_loops=Rd, no_grad_loops=ng).loss)
        mem.append({"name": name, "saved_for_backward_bytes": nbytes})
    mem[1]["ratio_vs_full"] = round(mem[1]["saved_for_backward_bytes"] / mem[0]["saved_for_backward_bytes"], 3)

    print(f"training throughput, {args.device}, fp32, batch {args.batch} × {args.seq_len} tokens, D={D}, "
          f"P={P} C={C} K={K}, R={R} (unrolled: {P + C * R + K} unique layers)")
    print(f"{'model':<24} {'loops':>5} {'params':>10} {'tokens/s':>10} {'vs unrolled':>12}")
    for row in rows:
        print(f"{row['name']:<24} {row['loops']:>5} {row['params']:>10} {row['tokens_per_s']:>10.0f} "
              f"{row['speed_vs_unrolled']:>11.2f}x")
    print(f"\nactivations saved for backward (batch {args.batch} × {args.seq_len})")
    for m in mem:
        extra = f"  ({m['ratio_vs_full']:.2f}x of full)" if "ratio_vs_full" in m else ""
        print(f"{m['name']:<40} {m['saved_for_backward_bytes'] / 2**20:8.1f} MiB{extra}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({"benchmark": "train_throughput", "machine": platform.machine(), "device": args.device,
                      "threads": torch.get_num_threads(), "dtype": "float32", "commit": commit,
                      "config": vars(args), "throughput": rows, "memory": mem,
                      "peak_memory_bytes": peak_memory(args.device)}))


if __name__ == "__main__":
    main()

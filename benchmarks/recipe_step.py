"""What a training step of a recipe costs, per loop count R, and over the loop counts its first N steps draw.

A step is the trainer's: the recipe's model, data, first phase's objective (LoopObjective: a readout and a
CE at every loop), forward + backward + AdamW step on one global batch. On a CPU it is timed in CPU
seconds of this process (`time.process_time`, one thread by default), which other jobs on the machine
disturb far less than wall time; on CUDA in wall seconds. The baseline recipe is timed in the same run
(by default the GPU-sized TinyStories recipe at R = 1 only: its logits at R = 8 take gigabytes).

    python benchmarks/recipe_step.py                                   # tinystories.yaml vs tinystories-gpu.yaml
    python benchmarks/recipe_step.py recipes/bundled.yaml --baseline none --steps 200

Prints a table, then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import time

import torch

from looplm.train import load_recipe
from looplm.train.objective import LoopObjective
from looplm.train.trainer import _optimizer, build_model, build_source, build_tokenizer, loops_for_step


def step_seconds(recipe_path: str, loop_counts: list[int] | None, *, device: str, repeats: int) -> dict:
    """Seconds of one training step at each R (best of `repeats`), and the mean over the loop counts the
    recipe's first `steps` steps draw (when every drawn R was timed)."""
    r = load_recipe(recipe_path)
    tok = build_tokenizer(r)
    torch.manual_seed(r.seed)
    model = build_model(r, tok).to(device).train()
    phase = r.phases[0]
    obj, opt = LoopObjective(model, phase.loss), _optimizer(model, phase, r)
    b = build_source(r, tok).batch(0, r.train.batch_size)
    ids, labels = b.input_ids.to(device), b.labels.to(device)
    lc = r.loops
    high = lc.num_loops if lc.sampling == "fixed" else lc.high
    seconds = {}
    for R in loop_counts or range(1, high + 1):
        no_grad = 0 if lc.backprop_loops is None else max(0, R - lc.backprop_loops)
        best = float("inf")
        for i in range(repeats + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter() if device.startswith("cuda") else time.process_time()
            opt.zero_grad(set_to_none=True)
            out = obj(ids, labels, num_loops=R, no_grad_loops=no_grad, progress=0.0, student_loop=R - 1 or None)
            out.loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = (time.perf_counter() if device.startswith("cuda") else time.process_time()) - t0
            best = min(best, t) if i else best
        seconds[R] = round(best, 3)
    return {"recipe": recipe_path, "tokens_per_step": ids.numel(), "params": sum(p.numel() for p in model.parameters()),
            "seconds_by_loops": seconds, "recipe_obj": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", nargs="?", default="recipes/tinystories.yaml")
    ap.add_argument("--baseline", default="recipes/tinystories-gpu.yaml", help="a recipe timed in the same run, or none")
    ap.add_argument("--baseline-loops", default="1", help="loop counts to time the baseline at (comma-separated)")
    ap.add_argument("--steps", type=int, default=200, help="the mean over the loop counts of the first N steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [step_seconds(args.recipe, None, device=args.device, repeats=args.repeats)]
    if args.baseline != "none":
        rows.append(step_seconds(args.baseline, [int(x) for x in args.baseline_loops.split(",")], device=args.device,
                                 repeats=args.repeats))
    unit = "wall s" if args.device.startswith("cuda") else f"CPU s ({args.threads} thread{'s' * (args.threads > 1)})"
    print(f"a training step, {unit}, fp32 on {args.device}")
    print(f"{'recipe':<32} {'params':>8} {'tokens':>7}  " + "  ".join(f"{f'R={R}':>7}" for R in range(1, 9))
          + f"  {f'first {args.steps}':>10}")
    for row in rows:
        r = row.pop("recipe_obj")
        drawn = collections.Counter(loops_for_step(r, s)[0] for s in range(min(args.steps, r.total_steps)))
        secs = row["seconds_by_loops"]
        row["drawn_loops"] = dict(sorted(drawn.items()))
        row["mean_step_seconds"] = (round(sum(secs[R] * n for R, n in drawn.items()) / sum(drawn.values()), 3)
                                    if set(drawn) <= set(secs) else None)
        mean = f"{row['mean_step_seconds']:.2f}" if row["mean_step_seconds"] is not None else "-"
        print(f"{row['recipe']:<32} {row['params'] / 1e6:7.1f}M {row['tokens_per_step']:>7}  "
              + "  ".join(f"{secs[R]:7.2f}" if R in secs else f"{'':>7}" for R in range(1, 9)) + f"  {mean:>10}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({"benchmark": "recipe_step", "machine": platform.machine(), "device": args.device,
                      "threads": torch.get_num_threads(), "dtype": "float32", "commit": commit, "config": vars(args),
                      "figures": rows}))


if __name__ == "__main__":
    main()

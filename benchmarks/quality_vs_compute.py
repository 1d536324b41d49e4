"""Quality vs compute on real text: mean next-token NLL (nats) against mean loops per token, per exit policy.

Two models, both real SmolLM2-135M-Instruct weights with layers I..J-1 looped R times (a retrofit: the
block was never trained to be looped):

1. `retrofit`: no exit gate. Policies: static (R = 1..Rmax), conv, kl.
2. `retrofit+gate`: the same weights plus an exit gate Linear(D, 1) fitted by Ouro's stage-II objective
   (arXiv 2510.25741; the LM is frozen, only the gate trains) on a TinyStories training split disjoint
   from the evaluation tokens. It is saved as a looplm dir (`<out dir>/smollm2-retrofit-gated`) and
   evaluated from that dir. Policies: static, q, conv, kl.

Stage II, per token and loop r: CE_r = next-token cross-entropy when exiting at loop r,
I_r = max(0, CE_{r-1} - CE_r) (detached), target w_r = sigmoid(k (I_r - gamma)) with k = 50, gamma = 0.005;
loss = BCE(1 - lambda_r, w_r) averaged over r = 2..R, lambda_r = sigmoid(gate(h_r)), h_r = loop r's
hidden state. Full-batch Adam on cached hidden states (features standardised for the fit; the scaling is
folded back into the gate's weight and bias, so the saved gate reads raw h_r).

Data (read from --data-dir, default the repo's ../shared/data):
  TinyStories  text/tinystories_val.txt: evaluation = the last --max-tokens tokens of the file in
               --seq-len chunks, gate training = up to --train-tokens tokens from its start (disjoint).
  GSM8K        gsm8k/test.jsonl, the first --gsm8k-items problems as question + "\\nAnswer: " + answer
               (calculator annotations <<...>> removed); only the answer's tokens are scored.

Every loop runs on every token once (`looplm.calibrate.loop_table`); a policy's curve is then read off the
per-token x per-loop table (`LoopTable.frontier`): a threshold's exit loop per token is the first loop
where its criterion holds. With a coda (the default core 10:14 leaves 16 coda layers) the NLL is that of
every position exiting at the same loop through the coda, an estimate of a full forward with exit=
(see looplm/calibrate.py); the mean loops are exact. Each table and subplot also shows the oracle: every
token exits at its own lowest-NLL loop, known only in hindsight: the headroom no exit policy can beat.

    python benchmarks/quality_vs_compute.py                       # core 10:14, R=4, ~8k + ~100 items
    python benchmarks/quality_vs_compute.py --max-tokens 2048 --gsm8k-items 10 --train-tokens 2048

Prints one table per (model, dataset), writes --out (PNG) and a JSON of every curve point next to it,
then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import looplm
from looplm.calibrate import LoopTable, chunk_tokens, loop_table
from looplm.checkpoint import build

REPO = Path(__file__).resolve().parent.parent
TINYSTORIES = Path("text/tinystories_val.txt")
GSM8K = Path("gsm8k/test.jsonl")
ANSWER_SEP = "\nAnswer: "
# colour, line style (each its own: the curves meet at the ends, issue 12), label
POLICY_STYLE = {"q": ("tab:blue", "-", "Q-exit (gate CDF ≥ q)"),
                "conv": ("tab:orange", "--", "conv (‖Δh‖/‖h‖ < tol)"),
                "kl": ("tab:green", "-.", "kl (KL(p_r‖p_r−1) < tol)")}


# --------------------------------------------------------------------------- data


def check_data(data_dir: Path) -> None:
    missing = [data_dir / f for f in (TINYSTORIES, GSM8K) if not (data_dir / f).is_file()]
    if missing:
        raise SystemExit(
            "quality_vs_compute: data files missing: " + ", ".join(str(m) for m in missing)
            + f"\nexpected {data_dir / TINYSTORIES} and {data_dir / GSM8K} (set --data-dir to the folder holding"
            " text/ and gsm8k/, by default the repo's ../shared/data)"
        )


def tinystories_splits(data_dir: Path, tok, *, eval_tokens: int, train_tokens: int, seq_len: int):
    """(evaluation chunks, training chunks): the last eval_tokens tokens of the file, the first
    train_tokens (shrunk if needed so the two never overlap)."""
    ids = tok.encode((data_dir / TINYSTORIES).read_text(encoding="utf-8"))
    if len(ids) < eval_tokens + 2 * seq_len:
        raise SystemExit(f"{data_dir / TINYSTORIES}: {len(ids)} tokens, too few for --max-tokens {eval_tokens}")
    eval_ids = ids[len(ids) - eval_tokens:]
    train_ids = ids[: min(train_tokens, len(ids) - eval_tokens)]
    evaluation = chunk_tokens([eval_ids], seq_len=seq_len, max_tokens=eval_tokens)
    training = chunk_tokens([train_ids], seq_len=seq_len, max_tokens=len(train_ids))
    return evaluation, training, len(ids)


def strip_calculator(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_sequences(data_dir: Path, tok, *, items: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Token lists of question + "\\nAnswer: " + answer and, per sequence, a mask over its next-token
    targets (positions 1..L-1, the order `loop_table` scores them in): True where the target token holds
    answer text. The text is tokenized whole; a token straddling the boundary (" Janet" carrying the
    separator's space) counts as an answer token since it holds answer characters."""
    seqs, masks = [], []
    with open(data_dir / GSM8K, encoding="utf-8") as f:
        for line in f:
            if len(seqs) >= items:
                break
            d = json.loads(line)
            prefix = d["question"] + ANSWER_SEP
            enc = tok(prefix + strip_calculator(d["answer"]), return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            is_answer = [end > len(prefix) for _, end in offsets]
            seqs.append(ids)
            masks.append(is_answer[1:])
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths batch together
    return [seqs[i] for i in order], [masks[i] for i in order]


def restrict(table: LoopTable, mask: torch.Tensor) -> LoopTable:
    return LoopTable(table.nll[mask], {k: v[mask] for k, v in table.stats.items()})


# --------------------------------------------------------------------------- stage-II gate


@torch.inference_mode()
def loop_states(model, sequences: list[list[int]], R: int, batch_size: int, device: str):
    """(hidden (R, N, D) fp32 on CPU, CE (R, N)) for every position that has a next token."""
    from tqdm import tqdm

    hidden, ce = [], []
    groups: list[list[list[int]]] = []
    for s in sequences:  # batches of equal length (no padding needed)
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(s):
            groups[-1].append(s)
        else:
            groups.append([s])
    for batch in tqdm(groups, desc="gate states", unit="batch"):
        ids = torch.tensor(batch, device=device)
        out = model(ids, num_loops=R, return_loops=True)
        targets = ids[:, 1:].flatten()
        hidden.append(out.loop_hidden[:, :, :-1].flatten(1, 2).float().cpu())
        ce.append(torch.stack([F.cross_entropy(out.loop_logits[r, :, :-1].flatten(0, 1).float(), targets,
                                               reduction="none") for r in range(R)]).cpu())
        del out
    return torch.cat(hidden, 1), torch.cat(ce, 1)


def stage2_targets(ce: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """w_r for r = 2..R: (R-1, N)."""
    improvement = (ce[:-1] - ce[1:]).clamp_min(0)
    return torch.sigmoid(k * (improvement - gamma))


def fit_gate(hidden: torch.Tensor, ce: torch.Tensor, *, k: float, gamma: float, steps: int, lr: float,
             holdout: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit λ = σ(w·h + b) so that 1 − λ_r matches w_r (BCE, r = 2..R), LM frozen. Returns (weight (1, D),
    bias (1,), report). The last `holdout` of the tokens is held out to report the loss on unseen text."""
    _, N, D = hidden.shape
    targets = stage2_targets(ce, k, gamma)  # (R-1, N)
    h = hidden[1:]  # h_r for r = 2..R
    n_fit = int(N * (1 - holdout))
    mu = h[:, :n_fit].reshape(-1, D).mean(0)
    sd = h[:, :n_fit].reshape(-1, D).std(0).clamp_min(1e-6)
    z = (h - mu) / sd

    torch.manual_seed(seed)
    lin = torch.nn.Linear(D, 1)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)

    def loss_of(zz, ww):  # continue probability 1 − λ = σ(−logit)
        return F.binary_cross_entropy_with_logits(-lin(zz).squeeze(-1), ww)

    fit_z, fit_w = z[:, :n_fit], targets[:, :n_fit]
    held_z, held_w = z[:, n_fit:], targets[:, n_fit:]
    with torch.no_grad():
        start = float(loss_of(fit_z, fit_w))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(fit_z, fit_w)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final, held = float(loss_of(fit_z, fit_w)), float(loss_of(held_z, held_w))
        c = fit_w.mean().clamp(1e-6, 1 - 1e-6)  # the best constant continue probability
        const_fit = float(F.binary_cross_entropy(c.expand_as(fit_w), fit_w))
        const_held = float(F.binary_cross_entropy(c.expand_as(held_w), held_w))
        # the w_r BCE floor: entropy of the soft targets (reached only by a perfect predictor)
        floor_held = float(F.binary_cross_entropy(held_w.clamp(1e-6, 1 - 1e-6), held_w))
        weight = (lin.weight / sd)  # (1, D): reads raw h
        bias = lin.bias - (lin.weight * mu / sd).sum(-1)
    improvement = (ce[:-1] - ce[1:]).clamp_min(0)
    report = {
        "tokens": N, "fit_tokens": n_fit, "heldout_tokens": N - n_fit, "steps": steps, "lr": lr, "k": k,
        "gamma": gamma,
        "loss_start": start, "loss_fit": final, "loss_heldout": held,
        "loss_constant_fit": const_fit, "loss_constant_heldout": const_held, "loss_floor_heldout": floor_held,
        "mean_target_continue": float(targets.mean()),
        "share_improving": float((improvement > gamma).float().mean()),  # I_r > γ  ⇔  w_r > 0.5
        "mean_ce_per_loop": [float(x) for x in ce.mean(1)],
    }
    return weight.detach().clone(), bias.detach().clone(), report


# --------------------------------------------------------------------------- curves and tables


def curves(table: LoopTable, kinds: list[str], points: int) -> dict:
    static = [float(x) for x in table.nll.mean(0)]
    out = {"tokens": len(table.nll), "static": [{"loops": r, "nll": n} for r, n in enumerate(static, start=1)]}
    best, arg = table.nll.min(1)  # not a policy: each token exits at its own best loop, known only in hindsight
    out["oracle"] = {"mean_loops": float((arg + 1).float().mean()), "nll": float(best.mean()),
                     "share_best_loop": [float((arg == r).float().mean()) for r in range(table.num_loops)]}
    for kind in kinds:
        out[kind] = table.frontier(kind, points=points)
    if "cdf" in table.stats:  # what the gate says on these tokens: mean λ_r per loop
        out["mean_exit_cdf_per_loop"] = [float(x) for x in table.stats["cdf"].mean(0)]
    return out


def representative(front: list[dict], R: int) -> list[dict]:
    """The points nearest to mean loops 1, 1.5, ..., R, plus the lowest-NLL point (deduplicated)."""
    picks = []
    for target in [1 + 0.5 * i for i in range(2 * (R - 1) + 1)]:
        best = min(front, key=lambda p: (abs(p["mean_loops"] - target), p["nll"]))
        if abs(best["mean_loops"] - target) <= 0.25:
            picks.append(best)
    picks.append(min(front, key=lambda p: (p["nll"], p["mean_loops"])))
    seen, out = set(), []
    for p in sorted(picks, key=lambda p: (p["mean_loops"], p["nll"])):
        if p["threshold"] not in seen:
            seen.add(p["threshold"])
            out.append(p)
    return out


def signed(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # no "-0.0000" for a rounding-level difference


def print_table(title: str, cur: dict, kinds: list[str], R: int) -> list[dict]:
    full, one = cur["static"][-1]["nll"], cur["static"][0]["nll"]
    rows = [{"policy": "static", "threshold": s["loops"], "mean_loops": float(s["loops"]), "nll": s["nll"]}
            for s in cur["static"]]
    for kind in kinds:
        rows += [{"policy": kind, **p} for p in representative(cur[kind], R)]
    rows.append({"policy": "oracle*", "threshold": None, "mean_loops": cur["oracle"]["mean_loops"],
                 "nll": cur["oracle"]["nll"]})
    for r in rows:
        r["delta_full"], r["delta_one_loop"] = r["nll"] - full, r["nll"] - one
    print(f"\n{title}  ({cur['tokens']} scored tokens; full depth = {R} loops, NLL {full:.4f}; 1 loop {one:.4f})")
    cols = ["policy", "threshold", "mean loops", "NLL", "Δ vs full", "Δ vs 1 loop"]
    lines = [[r["policy"], "-" if r["threshold"] is None else str(r["threshold"]) if r["policy"] == "static"
              else f"{r['threshold']:.4g}",
              f"{r['mean_loops']:.3f}", f"{r['nll']:.4f}", signed(r["delta_full"]), signed(r["delta_one_loop"])]
             for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]
    for line in [cols, ["-" * w for w in widths], *lines]:
        print("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))))
    print("* oracle: every token exits at its own lowest-NLL loop (hindsight, not a policy); share of tokens "
          "whose best loop is r = 1..R: " + ", ".join(f"{x:.3f}" for x in cur["oracle"]["share_best_loop"]))
    if "mean_exit_cdf_per_loop" in cur:
        print("mean exit CDF of the gate after loop r = 1..R: "
              + ", ".join(f"{x:.3f}" for x in cur["mean_exit_cdf_per_loop"]))
    return rows


def plot(results: dict, path: Path, R: int, suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    datasets = list(next(iter(results.values())))
    fig, axes = plt.subplots(len(models), len(datasets), figsize=(6.2 * len(datasets), 4.6 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, d in enumerate(datasets):
            ax, cur = axes[i][j], results[m][d]
            every_y = [cur["oracle"]["nll"]]
            for kind in ("q", "conv", "kl"):
                if kind in cur:
                    color, style, label = POLICY_STYLE[kind]
                    xs = [p["mean_loops"] for p in cur[kind]]
                    ys = [p["nll"] for p in cur[kind]]
                    every_y += ys
                    ax.plot(xs, ys, style, color=color, lw=1.6, marker=".", ms=4, label=label, alpha=0.8)
            sx = [s["loops"] for s in cur["static"]]
            sy = [s["nll"] for s in cur["static"]]
            ax.plot(sx, sy, "ks", ms=8, label="static R", zorder=5)
            ax.plot(cur["oracle"]["mean_loops"], cur["oracle"]["nll"], "*", color="tab:purple", ms=12, zorder=5,
                    label="oracle: per-token best loop (hindsight)")
            for x, y in zip(sx, sy):
                ax.annotate(f"R={x}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
            ax.set_title(f"{m} — {d} ({cur['tokens']} tokens)", fontsize=11)
            ax.set_xlabel("mean loops per token")
            ax.set_ylabel("mean next-token NLL (nats)")
            ax.set_xticks(range(1, R + 1))
            ax.set_xlim(0.85, R + 0.3)
            every_y += sy  # the axis holds every plotted point (issue 12), with room for the R labels
            ax.set_ylim(top=max(every_y) + 0.08 * (max(every_y) - min(every_y)))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=REPO, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="HF Llama safetensors dir (default: SmolLM2-135M)")
    ap.add_argument("--core", default="10:14", help="I:J, layers I..J-1 form the looped core")
    ap.add_argument("--loops", type=int, default=4, help="Rmax")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--max-tokens", type=int, default=8192, help="TinyStories evaluation tokens (the file's last)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gsm8k-items", type=int, default=100)
    ap.add_argument("--train-tokens", type=int, default=16384, help="TinyStories tokens (the file's first) for the gate")
    ap.add_argument("--gate-steps", type=int, default=400)
    ap.add_argument("--gate-lr", type=float, default=1e-3)
    ap.add_argument("--gate-k", type=float, default=50.0)
    ap.add_argument("--gate-gamma", type=float, default=0.005)
    ap.add_argument("--points", type=int, default=64, help="thresholds per frontier")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "quality_vs_compute.png")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = ap.parse_args()

    check_data(args.data_dir)
    try:
        I, J = (int(x) for x in args.core.split(":"))
    except ValueError:
        raise SystemExit(f"--core {args.core!r}: expected I:J") from None
    R, dev, dtype = args.loops, args.device, getattr(torch, args.dtype)
    if R < 2:
        raise SystemExit("--loops must be ≥ 2 (exits need more than one loop)")
    t_start = time.perf_counter()
    path = args.model or looplm.default_model_dir()
    tok = looplm.load_tokenizer(path)

    ts_eval, ts_train, ts_total = tinystories_splits(args.data_dir, tok, eval_tokens=args.max_tokens,
                                                     train_tokens=args.train_tokens, seq_len=args.seq_len)
    gsm_seqs, gsm_masks = gsm8k_sequences(args.data_dir, tok, items=args.gsm8k_items)
    gsm_mask = torch.tensor([m for ms in gsm_masks for m in ms], dtype=torch.bool)
    print(f"data: TinyStories {ts_total} tokens in the file; eval = last {sum(map(len, ts_eval))} "
          f"({len(ts_eval)} chunks of ≤{args.seq_len}), gate training = first {sum(map(len, ts_train))}; "
          f"GSM8K {len(gsm_seqs)} problems, {int(gsm_mask.sum())} answer tokens scored "
          f"({sum(map(len, gsm_seqs))} tokens run)", file=sys.stderr)

    # model 1: the retrofit (no gate)
    try:
        base = looplm.load(path, core=(I, J), num_loops=R, dtype=dtype, device=dev)
    except ValueError as e:
        raise SystemExit(f"cannot build the retrofit: {e}") from None
    cfg = base.config

    def tables(model, name: str, kinds: list[str]) -> dict:
        out = {}
        for dname, seqs, mask in (("TinyStories", ts_eval, None), ("GSM8K answers", gsm_seqs, gsm_mask)):
            t0 = time.perf_counter()
            print(f"[{name} / {dname}] running {R} loops on every token", file=sys.stderr)
            table = loop_table(model, seqs, num_loops=R, batch_size=args.batch_size, progress=True)
            if mask is not None:
                if len(mask) != len(table.nll):
                    raise RuntimeError(f"answer mask has {len(mask)} entries, the loop table {len(table.nll)} rows")
                table = restrict(table, mask)
            out[dname] = curves(table, kinds, args.points)
            out[dname]["seconds"] = time.perf_counter() - t0
        return out

    results = {"SmolLM2 retrofit": tables(base, "retrofit", ["conv", "kl"])}

    # model 2: the same weights + a stage-II gate fitted on the training split, saved and reloaded
    t0 = time.perf_counter()
    hidden, ce = loop_states(base, ts_train, R, batch_size=2, device=dev)
    weight, bias, gate_report = fit_gate(hidden, ce, k=args.gate_k, gamma=args.gate_gamma, steps=args.gate_steps,
                                         lr=args.gate_lr)
    del hidden, ce
    tensors = {k: v for k, v in base.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight")  # re-tied by build()
    tensors["early_exit_gate.weight"] = weight.to(dtype)
    tensors["early_exit_gate.bias"] = bias.to(dtype)
    gated = build(dataclasses.replace(cfg, exit_gate=True), tensors, where="stage-II gated retrofit", dtype=dtype,
                  device=dev)
    gated_dir = looplm.save(gated, args.out.parent / "smollm2-retrofit-gated", tokenizer_from=path)
    del gated
    gate_report["seconds"] = time.perf_counter() - t0
    gate_report["dir"] = str(gated_dir)
    print(f"gate: BCE {gate_report['loss_start']:.4f} → {gate_report['loss_fit']:.4f} (fit), held-out "
          f"{gate_report['loss_heldout']:.4f} vs best constant {gate_report['loss_constant_heldout']:.4f} "
          f"(floor {gate_report['loss_floor_heldout']:.4f}); share of (token, loop) with I_r > γ: "
          f"{gate_report['share_improving']:.3f}; mean CE per loop on the training split "
          + ", ".join(f"{x:.3f}" for x in gate_report["mean_ce_per_loop"]), file=sys.stderr)
    print(f"gated model saved to {gated_dir}", file=sys.stderr)
    gated = looplm.load(gated_dir, dtype=dtype, device=dev)
    results["SmolLM2 retrofit + stage-II gate"] = tables(gated, "retrofit+gate", ["q", "conv", "kl"])

    # the gate changes no hidden state: static NLL must agree between the two models (a save/load check)
    static_diff = max(abs(a["nll"] - b["nll"]) for d in results["SmolLM2 retrofit"]
                      for a, b in zip(results["SmolLM2 retrofit"][d]["static"],
                                      results["SmolLM2 retrofit + stage-II gate"][d]["static"]))

    summary = {}
    for m, per_data in results.items():
        summary[m] = {}
        for d, cur in per_data.items():
            kinds = [k for k in ("q", "conv", "kl") if k in cur]
            rows = print_table(f"{m} — {d}", cur, kinds, R)
            summary[m][d] = {"tokens": cur["tokens"], "rows": rows}
    print(f"\nstatic NLL, retrofit vs gated model reloaded from disk: max |diff| {static_diff:.2e}")

    commit, dirty = git_commit()
    title = (f"SmolLM2-135M-Instruct, layers {I}..{J - 1} looped (≤{R}); NLL vs mean loops per token; "
             f"{args.dtype} on {dev}; commit {commit}{'+dirty' if dirty else ''}")
    plot(results, args.out, R, title)
    json_path = args.out.with_suffix(".json")
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": str(path),
              "prelude": cfg.num_prelude_layers, "core_layers": cfg.num_core_layers, "coda": cfg.num_coda_layers,
              "torch": torch.__version__, "looplm_gated_dir": str(gated_dir)}
    json_path.write_text(json.dumps({"config": config, "commit": commit, "dirty": dirty, "gate": gate_report,
                                     "static_nll_max_abs_diff": static_diff, "curves": results}, indent=1) + "\n")
    print(f"wrote {args.out} and {json_path} in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None}
    figures = {"gate": {k: gate_report[k] for k in ("loss_fit", "loss_heldout", "loss_constant_heldout",
                                                    "share_improving", "mean_ce_per_loop")},
               "static_nll_max_abs_diff": static_diff,
               "curves": {m: {d: {"tokens": s["tokens"],
                                  "points": [{k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                                              for k, v in r.items() if k != "delta_one_loop"} for r in s["rows"]]}
                              for d, s in per.items()} for m, per in summary.items()},
               "png": str(args.out), "json": str(json_path), "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps({"machine": machine, "dtype": args.dtype, "commit": commit, "dirty": dirty, "config": config,
                      "figures": figures}))


if __name__ == "__main__":
    main()

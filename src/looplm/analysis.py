"""Diagnostics: does the looped state approach a fixed point, and how confident is each depth?

For every loop, and for every core layer inside each loop, on real text:
- relative change of the hidden state, ‖h − h_prev‖ / ‖h‖, and the cosine between them (after a loop:
  vs the previous loop's output; after a layer: vs the layer's input);
- logit-lens entropy (nats) of the next-token distribution read out at that point (coda, norm, head).
A fixed point shows as the loop-to-loop change falling towards 0 and the cosine rising towards 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .loops import LoopRun
from .model import LoopedLM


@dataclass
class LoopDiagnostics:
    core: tuple[int, int]  # layers [i, j) looped
    loops: int
    tokens: int
    rel_change: list[float]  # per loop, vs the previous loop's output (loop 1: vs the core's input)
    cosine: list[float]  # per loop, the same pairs
    entropy: list[float]  # per loop, logit-lens entropy of the readout
    layer_rel_change: list[list[float]]  # [loop][core layer]: the layer's output vs its input
    layer_entropy: list[list[float]]  # [loop][core layer]: logit lens after that layer


@torch.inference_mode()
def diagnose(model: LoopedLM, sequences: list[list[int]], *, num_loops: int | None = None) -> LoopDiagnostics:
    """Run `sequences` (token-id lists, scored as one right-padded batch each) through every loop."""
    R = model.resolve_loops(num_loops)
    cfg = model.config
    P, C = cfg.num_prelude_layers, cfg.num_core_layers
    sums = {k: torch.zeros(R) for k in ("rel", "cos", "ent")}
    layer_rel, layer_ent = torch.zeros(R, C), torch.zeros(R, C)
    count = 0
    for seq in sequences:
        ids = torch.tensor([seq], device=model.device)
        ctx = model.context(ids, None, None, R)
        prev = model.embed(ids, ctx)  # (1, S, D)

        def on_layer(loop_idx: int, layer_idx: int, x: torch.Tensor, y: torch.Tensor) -> None:
            layer_rel[loop_idx, layer_idx - P] += _rel(y, x).sum()
            layer_ent[loop_idx, layer_idx - P] += _entropy(model.readout(y, ctx)).sum()

        for loop in LoopRun(model, prev, ctx, R, logits=slice(None), on_layer=on_layer):
            r, x = loop.loop - 1, loop.hidden
            sums["rel"][r] += _rel(x, prev).sum()
            sums["cos"][r] += torch.nn.functional.cosine_similarity(x.float(), prev.float(), dim=-1).sum()
            sums["ent"][r] += _entropy(loop.logits).sum()
            prev = x
        count += ids.shape[1]
    n = max(1, count)
    return LoopDiagnostics(
        core=(P, P + C), loops=R, tokens=count,
        rel_change=(sums["rel"] / n).tolist(), cosine=(sums["cos"] / n).tolist(), entropy=(sums["ent"] / n).tolist(),
        layer_rel_change=(layer_rel / n).tolist(), layer_entropy=(layer_ent / n).tolist(),
    )


def _rel(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    h, prev = h.float(), prev.float()
    return ((h - prev).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12))[0]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)[0]


def plot(results: list[LoopDiagnostics], path: Path) -> Path:
    """Loop-to-loop change, cosine and entropy per loop, one line per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import integer_ticks, layered

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for k, d in enumerate(results):  # blocks often agree at loop 1: layered so each line stays visible
        loops = range(1, d.loops + 1)
        style = dict(label=f"core {d.core[0]}:{d.core[1]}", **layered(k, len(results)))
        axes[0].plot(loops, d.rel_change, **style)
        axes[1].plot(loops, d.cosine, **style)
        axes[2].plot(loops, d.entropy, **style)
    for ax, title in zip(axes, ("‖h_r − h_{r−1}‖ / ‖h_r‖", "cos(h_r, h_{r−1})", "logit-lens entropy (nats)")):
        ax.set(xlabel="loop", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        integer_ticks(ax.xaxis)
    axes[0].set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: list[LoopDiagnostics], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / "analysis.json"
    js.write_text(json.dumps([asdict(d) for d in results], indent=1) + "\n")
    return js, plot(results, out / "analysis.png")

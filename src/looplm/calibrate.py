"""Budgets: find the exit threshold that hits a target mean loop count (or quality loss) on real text.

One pass over calibration text runs every loop for every token (as a full forward does) and records,
per token and loop, the next-token NLL and the statistic each policy reads (exit CDF, relative change
of the hidden state, KL between successive loops, entropy). A threshold's exit loop per token is then
the first loop where the criterion holds, so the whole compute/quality frontier of a policy is read off
the table without running the model again. The predicted loop counts are exact for a full forward with
`exit=`, and so is the NLL for models without a coda (a coda attends across positions' exit states,
which the per-loop table reads at one loop at a time). In decoding, earlier tokens that exited early
expose their exit-loop KV, so the prediction is a close estimate there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .exits import parse_exit
from .loops import LoopRun
from .model import LoopedLM

KINDS = {"q": "cdf", "conv": "rel_change", "kl": "kl", "entropy": "entropy"}


@dataclass
class LoopTable:
    """Per token (T) and loop (R): NLL of the next token and each policy statistic."""

    nll: torch.Tensor  # (T, R)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # kind → (T, R)

    @property
    def num_loops(self) -> int:
        return self.nll.shape[1]

    def exit_loops(self, kind: str, threshold: float | torch.Tensor, *, min_loops: int = 1) -> torch.Tensor:
        """(T,) or (T, G) exit loop (1-based) under `kind:threshold` for each token (and threshold)."""
        s = self.stats[KINDS[kind]]  # (T, R)
        th = torch.as_tensor(threshold, dtype=s.dtype)
        s = s[..., None] if th.dim() else s
        fired = s >= th if kind == "q" else s < th  # (T, R[, G])
        fired[:, : min_loops - 1] = False
        fired[:, -1] = True  # the last loop always exits
        return fired.float().argmax(1) + 1  # first loop that fires

    def evaluate(self, exit_loops: torch.Tensor) -> tuple[float, float]:
        """(mean loops, mean NLL at the exits) for exit loops (T,)."""
        nll = self.nll.gather(1, (exit_loops - 1)[:, None])[:, 0]
        return float(exit_loops.float().mean()), float(nll.mean())

    def frontier(self, kind: str, *, points: int = 64, min_loops: int = 1) -> list[dict[str, float]]:
        """Thresholds spread over the statistic's observed values → mean loops and NLL, sorted by loops."""
        s = self.stats[KINDS[kind]][:, :-1].flatten()
        s = s[torch.isfinite(s)]
        if len(s) == 0:
            raise ValueError(f"nothing to calibrate: with {self.num_loops} loop(s), '{kind}' can never exit early "
                             "(kl needs two loops to compare; use more loops)")
        qs = torch.linspace(0, 1, points, dtype=s.dtype)
        ths = torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:100_000]], qs)
        ths = torch.cat([ths, ths.max()[None] + 1e-6, ths.min()[None] - 1e-6])
        # thresholds the policy accepts: q in [0, 1], the others > 0 (a statistic ≥ 0 is never below ≤ 0)
        ths = ths.clamp(0.0, 1.0) if kind == "q" else ths.clamp(min=1e-12)
        ths = ths.unique()
        exits = self.exit_loops(kind, ths, min_loops=min_loops)  # (T, G)
        nll = self.nll.gather(1, exits - 1)  # (T, G)
        rows = [{"threshold": float(t), "mean_loops": float(e.float().mean()), "nll": float(n.mean())}
                for t, e, n in zip(ths, exits.T, nll.T)]
        return sorted(rows, key=lambda r: (r["mean_loops"], r["nll"]))


@dataclass
class Calibration:
    policy: str  # e.g. "q:0.4123": pass it as exit=
    kind: str
    threshold: float
    mean_loops: float  # predicted on the calibration text
    nll: float  # mean next-token NLL (nats) at the exits
    nll_full_depth: float  # every token at R loops
    nll_static: list[float]  # every token at r loops, r = 1..R
    tokens: int
    frontier: list[dict[str, float]]


@torch.inference_mode()
def loop_table(model: LoopedLM, sequences: Sequence[Sequence[int]], *, num_loops: int | None = None,
               batch_size: int = 8, progress: bool = False) -> LoopTable:
    """Run every loop on every token of `sequences` (token-id lists) and tabulate NLL and statistics."""
    R = model.resolve_loops(num_loops)
    kinds = "q:1|conv:1|kl:1|entropy:1" if model.early_exit_gate is not None else "conv:1|kl:1|entropy:1"
    nlls, stats = [], {v: [] for v in KINDS.values()}
    batches = [sequences[i : i + batch_size] for i in range(0, len(sequences), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="calibrate", unit="batch")
    for batch in batches:
        S = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), S, dtype=torch.long)
        mask = torch.zeros(len(batch), S, dtype=torch.long)
        for i, s in enumerate(batch):  # right padding: no cache, and the targets are the next tokens
            ids[i, : len(s)] = torch.as_tensor(list(s))
            mask[i, : len(s)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        ctx = model.context(ids, mask, None, R)
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()  # (B, S-1)
        per_loop_nll, per_loop_stats = [], {v: [] for v in KINDS.values()}
        # every position runs every loop; the policy of every kind is there for its statistics
        for loop in LoopRun(model, model.embed(ids, ctx), ctx, R, policy=parse_exit(kinds), logits=slice(None)):
            logp = torch.log_softmax(loop.logits[:, :-1].float(), -1)  # (B, S-1, V)
            per_loop_nll.append(-logp.gather(-1, targets[..., None])[..., 0][valid])
            for kind in KINDS.values():
                value = getattr(loop.stats, kind)
                if value is not None:
                    per_loop_stats[kind].append(value.view(ids.shape)[:, :-1][valid].float())
        nlls.append(torch.stack(per_loop_nll, 1).cpu())
        for kind, values in per_loop_stats.items():
            if values:
                stats[kind].append(torch.stack(values, 1).cpu())
    return LoopTable(torch.cat(nlls), {k: torch.cat(v) for k, v in stats.items() if v})


def calibrate(model: LoopedLM, texts: Sequence[str] | Sequence[Sequence[int]], *, policy: str = "q",
              target_mean_loops: float | None = None, max_quality_loss: float | None = None,
              num_loops: int | None = None, tokenizer=None, seq_len: int = 256, max_tokens: int = 16_384,
              min_loops: int = 1, progress: bool = False) -> Calibration:
    """The threshold of `policy` ("q", "conv", "kl" or "entropy") that hits `target_mean_loops`
    (closest mean) or, with `max_quality_loss` (nats of NLL over full depth), the fewest mean loops
    within that loss. Texts are strings (with `tokenizer`) or token-id lists; they are joined and cut
    into `seq_len` chunks, `max_tokens` in all."""
    if policy not in KINDS:
        raise ValueError(f"calibrate policy {policy!r} is not one of {sorted(KINDS)}")
    if policy == "q" and model.early_exit_gate is None:
        raise ValueError("calibrate policy 'q' needs an exit gate; this model has none")
    if (target_mean_loops is None) == (max_quality_loss is None):
        raise ValueError("give exactly one of target_mean_loops and max_quality_loss")
    R = model.resolve_loops(num_loops)
    if target_mean_loops is not None and not 1 <= target_mean_loops <= R:
        raise ValueError(f"target_mean_loops={target_mean_loops} is outside [1, {R}]")
    sequences = chunk_tokens(texts, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    table = loop_table(model, sequences, num_loops=R, progress=progress)
    front = table.frontier(policy, points=256, min_loops=min_loops)
    full = float(table.nll[:, -1].mean())
    if target_mean_loops is not None:
        best = min(front, key=lambda r: (abs(r["mean_loops"] - target_mean_loops), r["nll"]))
    else:
        within = [r for r in front if r["nll"] - full <= max_quality_loss]
        best = min(within, key=lambda r: (r["mean_loops"], r["nll"])) if within else front[-1]
    return Calibration(
        policy=f"{policy}:{best['threshold']:.6g}" + (f",min={min_loops}" if min_loops > 1 else ""),
        kind=policy, threshold=best["threshold"], mean_loops=best["mean_loops"], nll=best["nll"],
        nll_full_depth=full, nll_static=[float(x) for x in table.nll.mean(0)], tokens=len(table.nll),
        frontier=front,
    )


def chunk_tokens(texts, *, tokenizer=None, seq_len: int = 256, max_tokens: int = 16_384) -> list[list[int]]:
    """Strings or token lists → chunks of `seq_len` tokens (at most `max_tokens` in all)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
    ids: list[int] = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts are strings: pass tokenizer=")
            ids.extend(tokenizer.encode(t))
        else:
            ids.extend(int(i) for i in t)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("calibration text has fewer than 2 tokens")
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) >= 2]

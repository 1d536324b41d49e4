"""The loop driver: the one place that runs the core R times over a batch (DESIGN.md, "Layers of the package").

    run = LoopRun(model, x, ctx, R, policy=policy, logits=slice(None), drop=True)
    for loop in run:                  # one `Loop` per pass of the core, after the loop norm and the gate
        loop.loop, loop.hidden, loop.lam, loop.logits, loop.exits, loop.stats
    run.exit_loop, run.exit_hidden    # each position's exit loop (1-based) and its state there
    run.core_layer_evals              # (position, core layer) evaluations: C × Σ loops run

Per loop it runs injection, the core layers and the loop norm (`LoopedLM.core_loop`), the exit gate, the
per-loop readout when asked for (or when the exit policy reads logits), the policy's statistics and its
decision. Exiting at loop r is what DESIGN.md defines: the position's state h_r is kept (`exit_hidden`) for
the coda, norm and head; the caller reads it out. Without `drop` every position runs every loop, as a
prefill or a training step must (each loop's KV is kept); with `drop` a row whose positions have all exited
leaves the batch, and the later loops run on the rows still looping only (decoding). The callers:
`LoopedLM.forward`, `looplm.engine` (decode steps), `calibrate`, `analysis`, the training objective and
the retrofit search. The request engine (`looplm.batching`) runs one loop per step over items at different
loops, so it calls `core_loop` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .exits import ExitPolicy, LoopStats, LoopTracker

if TYPE_CHECKING:
    from .model import LoopedLM, _Context


@dataclass
class Loop:
    """What one loop produced, for the rows still looping (n of the run's B)."""

    loop: int  # 1-based: loops run so far
    hidden: torch.Tensor  # (n, S, D) the loop's output, after the loop norm
    lam: torch.Tensor | None  # (n, S) λ = σ(gate(h)) in fp32; None without a gate
    logits: torch.Tensor | None  # (n, k, V) readout of this loop at the `logits` positions, when asked for
    rows: torch.Tensor  # (n,) which rows of the run's batch these are
    exits: torch.Tensor | None  # (n, S) bool: positions that exit at this loop (policy runs only)
    stats: LoopStats | None  # the policy's statistics (policy runs only)


class LoopRun:
    """Loops of the core over x (B, S, D), the output of the embedding and prelude (or of loop `start`).

    e: the prelude output re-injected at loops ≥ 2 (default x). policy: an exit policy (None: every
    position runs all R loops). logits: the positions read out after every loop (a slice or index tensor;
    None: none, unless the policy reads logits, then all). drop: rows whose positions all exited leave the
    batch. grad_from: loops before it run without autograd and their output is detached (truncated
    backprop, Huginn arXiv 2502.05171); the gate's λ still follows the caller's grad mode. start: loops
    already run (x is loop `start`'s output). block: the layers [i, j) looped instead of the config's core
    (retrofit search). on_layer(loop_idx, layer_idx, x_in, x_out): called after each core layer (analysis).
    """

    def __init__(self, model: LoopedLM, x: torch.Tensor, ctx: _Context, num_loops: int, *,
                 e: torch.Tensor | None = None, policy: ExitPolicy | None = None,
                 logits: slice | torch.Tensor | None = None, drop: bool = False, grad_from: int = 0,
                 start: int = 0, block: tuple[int, int] | None = None,
                 on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None):
        assert policy is None or start == 0, "an exit policy's statistics start at loop 1"
        self.model, self.x, self.ctx, self.num_loops = model, x, ctx, num_loops
        self.e = x if e is None else e
        self.policy, self.drop, self.grad_from, self.start = policy, drop, grad_from, start
        self.read = slice(None) if policy is not None and "logits" in policy.needs else logits
        self.block, self.on_layer = block, on_layer
        self.num_layers = model.config.num_core_layers if block is None else block[1] - block[0]
        B, S, _ = x.shape
        # filled as the loops run: each position's exit loop (1-based) and its state at that loop
        self.exit_loop = torch.full((B, S), num_loops, dtype=torch.long, device=x.device) if policy is None \
            else torch.zeros(B, S, dtype=torch.long, device=x.device)
        self.exit_hidden = x if policy is None else torch.empty_like(x)
        self.core_layer_evals = 0

    def __iter__(self) -> Iterator[Loop]:
        model, ctx, policy, R = self.model, self.ctx, self.policy, self.num_loops
        x, e = self.x, self.e  # (n, S, D): the rows still looping
        B, S, _ = x.shape
        rows = torch.arange(B, device=x.device)  # (n,) the rows still looping
        sub = ctx
        tracker = None if policy is None else LoopTracker(policy, B * S, x.device, start_hidden=x.flatten(0, 1))
        training = torch.is_grad_enabled()
        for loop_idx in range(self.start, R):
            grad = training and loop_idx >= self.grad_from
            with torch.set_grad_enabled(grad):
                x = model.core_loop(x, e, sub, loop_idx, block=self.block, on_layer=self.on_layer)
                logits = None if self.read is None else model.readout(x, sub, self.read)
            if training and not grad:
                x = x.detach()
            self.core_layer_evals += x.shape[0] * S * self.num_layers
            lam = model.exit_lambda(x)  # (n, S) or None
            exits = stats = None
            if tracker is not None:
                stats = tracker.step(loop_idx + 1, hidden=x.flatten(0, 1), lam=None if lam is None else lam.flatten(),
                                     logits=None if logits is None else logits.flatten(0, 1))
                exits = self._record(policy.exits(stats, R).view(-1, S), rows, x, loop_idx + 1)
            elif loop_idx + 1 == R:
                self.exit_hidden = x
            yield Loop(loop_idx + 1, x, lam, logits, rows, exits, stats)
            if self.drop and tracker is not None and loop_idx + 1 < R:
                stay = (self.exit_loop[rows] == 0).any(1)  # (n,) rows with a position still looping
                if not bool(stay.any()):
                    return
                rows, x, e = rows[stay], x[stay], e[stay]
                tracker.keep(stay[:, None].expand(-1, S).flatten())
                sub = ctx.select(rows)

    def _record(self, fired: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, loop: int) -> torch.Tensor:
        """Record the positions of `rows` that exit now; (n, S) bool."""
        if rows.shape[0] == self.exit_loop.shape[0]:  # every row still here: no gather / scatter
            new, self.exit_loop, self.exit_hidden = first_exits(fired, loop, x, self.exit_loop, self.exit_hidden)
            return new
        new, exit_loop, exit_hidden = first_exits(fired, loop, x, self.exit_loop[rows], self.exit_hidden[rows])
        self.exit_loop[rows], self.exit_hidden[rows] = exit_loop, exit_hidden
        return new

    def to_end(self) -> LoopRun:
        """Run every loop (nothing read on the way); `exit_hidden` then holds each position's exit state."""
        for _ in self:
            pass
        return self


def first_exits(fired: torch.Tensor, loop: int, x: torch.Tensor, exit_loop: torch.Tensor,
                exit_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose policy fired at `loop` and had not exited before exit now: (new (N, S) bool, exit_loop
    (N, S) with `loop` where new, exit_hidden (N, S, D) with x where new). fired (N, S); x (N, S, D)."""
    new = fired & (exit_loop == 0)
    return new, torch.where(new, loop, exit_loop), torch.where(new[..., None], x, exit_hidden)

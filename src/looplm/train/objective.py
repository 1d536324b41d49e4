"""One training forward of a looped model: every loop's loss through the shared head, in one module.

`LoopObjective` wraps a `LoopedLM` so that distributed wrappers (DDP, FSDP via accelerate) see a single
`forward` that returns the loss: the gradient all-reduce hooks only fire on a wrapped module's forward.
It runs the pipeline loop by loop (the model's own `embed` / `core_loop` / `readout`), computes each
loop's token cross-entropy as soon as its logits exist (only the teacher and student logits for
self-distillation are kept), and combines them with the pure losses of `looplm.losses`.

Truncated backprop (Huginn, arXiv 2502.05171): the first `no_grad_loops` loops run without autograd
and their output is detached, so activation memory grows with the loops trained, not the loops run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import losses
from ..loops import LoopRun
from ..model import Attention, LoopedLM, _Context

STAGES = ("per_loop", "stage1", "stage2")


@dataclass
class LossConfig:
    """What the loss of one step is made of (a recipe's `loss:` section)."""

    # per_loop: mean_r CE_r (or the last loop only, last_loop_only). stage1: Σ_r p(r)·CE_r − β·H(p).
    # stage2: the LM is frozen; BCE of the gate against the detached per-loop improvement.
    stage: str = "stage1"
    beta_start: float = 0.1  # Ouro stage I: β 0.1 → 0.05
    beta_end: float = 0.05
    gate_k: float = 50.0  # stage II: w_r = σ(k (I_r − γ))
    gate_gamma: float = 0.005
    distill_weight_start: float = 0.0  # self-distillation KL(p_R ‖ p_r), r drawn uniformly from 1..R−1
    distill_weight_end: float = 0.0
    distill_temperature: float = 1.0
    last_loop_only: bool = False  # per_loop stage: train only the deepest loop's CE (a plain looped LM)
    # per_loop stage: loop r is trained on the problem's r-th intermediate (the variable a chain query
    # reaches after r hops, data with hop labels) instead of the final answer: intermediate supervision
    hop_targets: bool = False
    # every n-th step (0: never) the answer positions (from each row's prompt end on) attend as decode steps
    # under kv="last" do: to the earlier positions' last-loop K/V and to themselves, so that sharing the last
    # loop's KV at decode time costs little (the prompt keeps per-loop attention)
    last_kv_every: int = 0
    # those K/V come from the step's own per-loop pass with their gradient (a second pass for the answers), so
    # the prompt learns last-loop K/V that decode steps can read; False: from a no-grad pass (cheaper, weaker)
    last_kv_grad: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"loss.stage={self.stage!r} is not one of {list(STAGES)}")
        for name in ("beta_start", "beta_end", "distill_weight_start", "distill_weight_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.last_kv_every < 0:
            raise ValueError(f"loss.last_kv_every must be ≥ 0, got {self.last_kv_every}")
        if self.hop_targets and self.stage != "per_loop":
            raise ValueError(f"loss.hop_targets applies to stage 'per_loop' only, not {self.stage!r}")


@dataclass
class StepOutput:
    loss: torch.Tensor
    ce: torch.Tensor  # (R,) mean CE of each loop over the predicted tokens (detached)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # exit_pdf (R,), exit_entropy, distill, ...


class LoopObjective(nn.Module):
    def __init__(self, model: LoopedLM, loss: LossConfig):
        super().__init__()
        self.model = model
        self.loss_config = loss
        if loss.stage in ("stage1", "stage2") and model.early_exit_gate is None:
            raise ValueError(f"loss.stage={loss.stage!r} trains an exit gate; the model has none (exit_gate=False)")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, num_loops: int, no_grad_loops: int = 0,
                progress: float = 0.0, student_loop: int | None = None,
                hop_labels: torch.Tensor | None = None, decode_from: torch.Tensor | None = None) -> StepOutput:
        """input_ids, labels (B, S) (labels already shifted: labels[t] is the target at t, −100 = none).
        hop_labels (H, B, S): the target after hop h + 1 (loss.hop_targets trains loop r on row min(r, H) − 1).
        decode_from (B,): where each row's answer begins; given, positions from there on attend as decode
        steps under kv="last" (the trainer passes it on loss.last_kv_every steps).

        progress ∈ [0, 1] drives the β and distillation-weight schedules; student_loop (1..R−1) is the
        loop the deepest loop teaches this step (drawn by the trainer so every process agrees).
        """
        m, cfg = self.model, self.loss_config
        R = num_loops
        if not 0 <= no_grad_loops < R:
            raise ValueError(f"no_grad_loops={no_grad_loops} must be in [0, num_loops={R})")
        mask = labels != losses.IGNORE_INDEX  # (B, S)
        hops = hop_labels if cfg.hop_targets else None
        if cfg.hop_targets and (hop_labels is None or hop_labels.shape[1:] != labels.shape):
            raise ValueError("loss.hop_targets needs hop labels (H, B, S) from the data (the chain task)")
        want_distill = max(cfg.distill_weight_start, cfg.distill_weight_end) > 0 and R > 1 and student_loop is not None
        frozen_lm = cfg.stage == "stage2"
        run = dict(labels=labels, hops=hops, R=R, no_grad_loops=no_grad_loops, frozen_lm=frozen_lm,
                   keep=(student_loop, R) if want_distill else ())
        ctx = m.context(input_ids, None, None, R)
        if decode_from is not None:
            decode_from = decode_from.to(input_ids.device)
            shared = None if cfg.last_kv_grad else self._last_loop_kv(input_ids, R)
            ctx.attend = replay = LastLoopKV(ctx, shared, decode_from)
        ces, hop_ces, lambdas, kept = self._loops(input_ids, ctx, **run)
        if decode_from is not None and cfg.last_kv_grad:
            # second pass: the answer positions attend to the first pass's last-loop K/V, gradient included, so
            # the prompt learns K/V that decode steps can read; the step's loss takes each position from the
            # pass that matches how it is served (prompt: per-loop prefill, answers: decode under kv="last")
            ctx2 = m.context(input_ids, None, None, R)
            ctx2.attend = LastLoopKV(ctx2, _core_kv(m, replay.kv), decode_from)
            dec = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= decode_from[:, None]
            ces2, hop_ces2, lambdas2, kept2 = self._loops(input_ids, ctx2, **run)
            ces = [torch.where(dec, b, a) for a, b in zip(ces, ces2)]
            hop_ces = [torch.where(dec, b, a) for a, b in zip(hop_ces, hop_ces2)]
            lambdas = [torch.where(dec, b, a) for a, b in zip(lambdas, lambdas2)]
            kept = {r: torch.where(dec[..., None], kept2[r], kept[r]) for r in kept}
        ce = torch.stack(ces)  # (R, B, S)
        stats: dict[str, torch.Tensor] = {}
        if cfg.stage == "stage1":
            beta = losses.linear_schedule(progress, 1.0, cfg.beta_start, cfg.beta_end)
            loss, s = losses.stage1_loss(ce, torch.stack(lambdas, -1), mask, beta=beta)
            stats.update(s)
        elif cfg.stage == "stage2":
            loss, s = losses.stage2_gate_loss(ce, torch.stack(lambdas, -1), mask, k=cfg.gate_k, gamma=cfg.gate_gamma)
            stats.update(s)
        else:
            trained = torch.stack(hop_ces) if hops is not None else ce
            per_loop = trained[-1:] if cfg.last_loop_only else trained[no_grad_loops:]
            loss = (per_loop * mask).sum() / (mask.sum().clamp(min=1) * per_loop.shape[0])
        if lambdas and cfg.stage != "stage1":
            pdf = losses.exit_distribution(torch.stack(lambdas, -1).detach())
            stats["exit_pdf"] = (pdf * mask[..., None]).sum((0, 1)) / mask.sum().clamp(min=1)
            stats["exit_entropy"] = ((losses.exit_entropy(pdf) * mask).sum() / mask.sum().clamp(min=1))
        if want_distill:
            w = losses.linear_schedule(progress, 1.0, cfg.distill_weight_start, cfg.distill_weight_end)
            kl = losses.self_distillation_loss(kept[R], kept[student_loop], mask, temperature=cfg.distill_temperature)
            loss = loss + w * kl
            stats["distill_kl"] = kl.detach()
        ce_mean = (ce.detach() * mask).sum((1, 2)) / mask.sum().clamp(min=1)  # (R,)
        return StepOutput(loss=loss, ce=ce_mean, stats=stats)

    def _loops(self, input_ids, ctx, *, labels, hops, R, no_grad_loops, frozen_lm, keep):
        """Run embed and R loops; per loop the token CE (B, S), the hop CE, the gate's λ; the logits of loops in keep.
        Stage II (frozen_lm) runs the LM without autograd; the gate trains on its detached features."""
        m = self.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_lm):
            x = m.embed(input_ids, ctx)  # (B, S, D)
        ces, hop_ces, lambdas, kept = [], [], [], {}
        run = LoopRun(m, x, ctx, R, logits=slice(None), grad_from=R if frozen_lm else no_grad_loops)
        for loop in run:  # each loop's CE as soon as its logits exist: only the kept logits stay alive
            ces.append(losses.per_loop_ce(loop.logits[None], labels)[0])  # (B, S)
            if hops is not None:
                hop_ces.append(losses.per_loop_ce(loop.logits[None], hops[min(loop.loop, len(hops)) - 1])[0])
            if loop.lam is not None:
                lambdas.append(loop.lam)
            if loop.loop in keep:
                kept[loop.loop] = loop.logits
        return ces, hop_ces, lambdas, kept

    @torch.no_grad()
    def _last_loop_kv(self, input_ids: torch.Tensor, R: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each core layer's K/V after the last of R loops (per-loop attention throughout), without autograd."""
        return _last_loop_pass(self.model, input_ids, R)[1]


def _core_kv(model: LoopedLM, collected: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """The core layers' entries of a context's collected K/V: their K/V after the last loop."""
    return {i: kv for i, kv in collected.items() if model.config.is_core(i)}


class LastLoopKV:
    """The attend hook of a training context (`_Context.attend`): keeps each layer's K/V (a core layer's entry
    ends at the last loop, autograd kept) and, with `shared` (layer → the last-loop K/V of an earlier pass, RoPE
    applied), lets positions ≥ decode_from (B,) attend as decode steps under kv="last" do (`decoded_attention`)."""

    def __init__(self, ctx: _Context, shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 decode_from: torch.Tensor | None = None):
        self.ctx, self.shared, self.decode_from = ctx, shared, decode_from
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layer_idx: int) -> torch.Tensor:
        self.kv[layer_idx] = (k, v)
        y = attn.sdpa(q, k, v, self.ctx.view(attn.sliding))  # (B, H, S, Dh): per-loop attention, as a prefill
        if self.shared is not None and layer_idx in self.shared:
            k_last, v_last = self.shared[layer_idx]
            y = decoded_attention(q, k, v, y, k_last, v_last, self.decode_from, scale=attn.scale,
                                  window=attn.window if attn.sliding else None)
        return y


def decoded_attention(q, k, v, y, k_last, v_last, decode_from, *, scale: float, window: int | None = None):
    """Positions t ≥ decode_from[b] attend as a decode step under kv="last" does: to the earlier positions'
    last-loop K/V (k_last, v_last (B, Hkv, S, Dh), from an earlier pass) and to their own K/V at this loop
    (k, v). Other positions keep y (B, H, S, Dh), the prefill's per-loop attention. q (B, H, S, Dh). Full
    sequences, no padding before the decoded part (training batches are right-padded). window: a sliding
    layer's decode step sees the last `window` positions, itself included."""
    B, H, S, Dh = q.shape
    rep = H // k.shape[1]
    k_last, v_last, k, v = (t.repeat_interleave(rep, dim=1) for t in (k_last, v_last, k, v))
    past = (q @ k_last.transpose(-1, -2)) * scale  # (B, H, S, S)
    earlier = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)
    if window is not None:
        earlier = earlier & ~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-window)
    past = past.masked_fill(~earlier, float("-inf"))
    own = (q * k).sum(-1, keepdim=True) * scale  # (B, H, S, 1)
    w = torch.softmax(torch.cat([past, own], -1).float(), -1).to(q.dtype)
    decoded = w[..., :S] @ v_last + w[..., S:] * v  # (B, H, S, Dh)
    take = torch.arange(S, device=q.device)[None, :] >= decode_from[:, None]  # (B, S)
    return torch.where(take[:, None, :, None], decoded, y)


def _last_loop_pass(model: LoopedLM, input_ids: torch.Tensor, R: int, shared=None, decode_from=None):
    """Embed and R loops, collecting each layer's K/V; with shared, positions ≥ decode_from attend to it as decode
    steps under kv="last" do. Returns the last hidden state, the core layers' last-loop K/V and the context."""
    ctx = model.context(input_ids, None, None, R)
    ctx.attend = replay = LastLoopKV(ctx, shared, decode_from)
    x = LoopRun(model, model.embed(input_ids, ctx), ctx, R).to_end().exit_hidden
    return x, _core_kv(model, replay.kv), ctx


@torch.no_grad()
def decode_like_logits(model: LoopedLM, input_ids: torch.Tensor, decode_from: torch.Tensor, num_loops: int,
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The deepest loop's logits (B, S, V) when positions ≥ decode_from[b] are generated one at a time under
    kv="last" (each attends to the earlier positions' last-loop K/V and to its own) and the prompt is prefilled
    with per-loop attention: teacher-forced, what generation with the last loop's KV shared scores. Exact: the
    decoded positions' own last-loop K/V are refined pass by pass (pass j fixes decoded position j), so it takes
    one pass more than the longest decoded part. Rows are right-padded; lengths (B,), when given, bounds the
    decoded parts (what follows a row's end cannot change what comes before it)."""
    decode_from = decode_from.to(input_ids.device)
    ends = torch.full_like(decode_from, input_ids.shape[1]) if lengths is None else lengths.to(decode_from)
    passes = 1 + int((ends - decode_from).clamp(min=0).max())
    shared = None
    for _ in range(passes):
        x, shared, ctx = _last_loop_pass(model, input_ids, num_loops, shared, decode_from)
    return model.readout(x, ctx)

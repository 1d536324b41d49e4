"""Training objectives for looped models, as pure functions of tensors.

Every loss takes per-loop quantities that `looplm.train.LoopTrainer` (or your own loop) computes in one
forward — logits of every loop through the shared head, the exit gate's λ_r — and returns a scalar
plus nothing hidden. Shapes: R loops, B batch, S sequence, V vocab. `mask` (B, S) marks the positions
whose next token is predicted (label ≠ ignore_index); every mean is over those positions.

    per_loop_ce          CE_r(t) = −log p_r(y_t | x_≤t)                                   (R, B, S)
    stage1_loss          Σ_r p(r)·CE_r − β·H(p)          Ouro (arXiv 2510.25741) §3, stage I
    stage2_gate_loss     BCE(1 − λ_{r−1}, σ(k(I_r − γ))), I_r = max(0, CE_{r−1} − CE_r)   Ouro stage II
    self_distillation    KL(p_R ‖ p_r) for a drawn shallower loop r (the deepest loop teaches; ELT)
    sample_num_loops     random loop counts: Huginn's Poisson-lognormal, or uniform
    linear_schedule      β and distillation-weight schedules
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import exit_distribution

IGNORE_INDEX = -100


def per_loop_ce(loop_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token cross-entropy of every loop: loop_logits (R, B, S, V), labels (B, S) → (R, B, S).

    labels[b, t] is the target of position t (already shifted); positions with ignore_index get 0.
    The softmax runs in fp32 whatever the logits' dtype.
    """
    R, B, S, V = loop_logits.shape
    if labels.shape != (B, S):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits (B, S) = {(B, S)}")
    mask = labels != ignore_index
    target = torch.where(mask, labels, 0)[None].expand(R, B, S)  # (R, B, S)
    logp = F.log_softmax(loop_logits.float(), dim=-1)  # (R, B, S, V)
    ce = -logp.gather(-1, target[..., None]).squeeze(-1)  # (R, B, S)
    return ce * mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True positions of mask (same trailing shape); 0 when none."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def exit_entropy(pdf: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_r p(r) log p(r) of an exit pdf (..., R) → (...). 0·log 0 = 0."""
    return -(pdf * pdf.clamp(min=1e-12).log()).sum(-1)


def stage1_loss(ce: torch.Tensor, exit_lambda: torch.Tensor, mask: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, dict]:
    """Ouro stage I: L = mean_t [Σ_r p_t(r)·CE_r(t) − β·H(p_t)] (uniform prior ⇒ the KL is −H + const).

    ce (R, B, S) from `per_loop_ce`; exit_lambda (B, S, R) the gate's λ_r = σ(gate(h_r)); mask (B, S).
    The gate gets gradients through p(r) (it learns which loops are worth their loss); every loop's
    CE gets gradient weight p(r). Returns (loss, stats) with the expected CE, the mean entropy and the
    mean exit pdf (R,) over the masked positions.
    """
    R = ce.shape[0]
    if exit_lambda.shape != (*ce.shape[1:], R):
        raise ValueError(f"exit_lambda shape {tuple(exit_lambda.shape)} != (B, S, R) = {(*ce.shape[1:], R)}")
    pdf = exit_distribution(exit_lambda.float())  # (B, S, R)
    expected_ce = (pdf * ce.permute(1, 2, 0)).sum(-1)  # (B, S)
    entropy = exit_entropy(pdf)  # (B, S)
    loss = _masked_mean(expected_ce - beta * entropy, mask)
    m = mask[..., None].float()
    stats = {
        "expected_ce": _masked_mean(expected_ce, mask).detach(),
        "exit_entropy": _masked_mean(entropy, mask).detach(),
        "exit_pdf": ((pdf * m).sum((0, 1)) / m.sum().clamp(min=1)).detach(),  # (R,)
    }
    return loss, stats


def stage2_targets(ce: torch.Tensor, *, k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """Continue-targets w (R−1, B, S) for the gate after loops 1..R−1 (Ouro stage II).

    I_r = max(0, CE_{r−1} − CE_r) is what loop r buys (r = 2..R, detached); w_r = σ(k·(I_r − γ)) is the
    ideal probability of running loop r, i.e. of *not* exiting after loop r−1.
    """
    ce = ce.detach().float()
    improvement = (ce[:-1] - ce[1:]).clamp(min=0)  # (R−1, B, S): I_2..I_R
    return torch.sigmoid(k * (improvement - gamma))


def stage2_gate_loss(ce: torch.Tensor, exit_lambda: torch.Tensor, mask: torch.Tensor, *,
                     k: float = 50.0, gamma: float = 0.005) -> tuple[torch.Tensor, dict]:
    """Ouro stage II (language model frozen, gate only): mean over r = 2..R and masked positions of
    BCE(1 − λ_{r−1}, w_r), with w_r from `stage2_targets`.

    λ_{r−1} is read after loop r−1 and decides whether loop r runs, so it is paired with the
    improvement loop r brings (Q-exit stops at r−1 when λ_{r−1} is high, which is right when I_r ≈ 0).
    ce is detached here: no gradient reaches the language model through this loss.
    """
    R = ce.shape[0]
    if R < 2:
        raise ValueError("stage II needs at least 2 loops (it learns whether loop r is worth running)")
    w = stage2_targets(ce, k=k, gamma=gamma)  # (R−1, B, S)
    cont = 1 - exit_lambda[..., :-1].float().permute(2, 0, 1)  # (R−1, B, S): 1 − λ_1..λ_{R−1}
    bce = F.binary_cross_entropy(cont.clamp(1e-6, 1 - 1e-6), w, reduction="none")  # (R−1, B, S)
    loss = _masked_mean(bce.mean(0), mask)
    stats = {"gate_target_continue": _masked_mean(w.mean(0), mask).detach()}
    return loss, stats


def self_distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, *,
                           temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) per masked position, averaged; the teacher (the deepest loop) is detached.

    teacher_logits, student_logits (B, S, V). With temperature τ both distributions are softened and the
    loss is scaled by τ² (Hinton et al.) so its gradient size does not depend on τ.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, S)
    return _masked_mean(kl, mask) * temperature**2


def sample_num_loops(generator: torch.Generator, *, kind: str = "poisson_lognormal", mean: float = 4.0,
                     sigma: float = 0.5, low: int = 1, high: int | None = None) -> int:
    """A random loop count for one batch.

    poisson_lognormal (Huginn, arXiv 2502.05171): τ ~ N(log(mean) − σ²/2, σ), R = 1 + Poisson(e^τ − 1)
    clipped to [low, high]: mean ≈ `mean`, a heavy right tail. uniform: R ~ U{low..high}.
    Same generator state ⇒ same R on every process (draw it from a generator seeded by the step).
    """
    if kind == "uniform":
        if high is None or high < low or low < 1:
            raise ValueError(f"uniform loop counts need 1 ≤ low ≤ high, got low={low}, high={high}")
        return int(torch.randint(low, high + 1, (1,), generator=generator))
    if kind != "poisson_lognormal":
        raise ValueError(f"unknown loop-count distribution {kind!r}; choose 'poisson_lognormal' or 'uniform'")
    if mean < 1 or sigma < 0:
        raise ValueError(f"poisson_lognormal needs mean ≥ 1 and sigma ≥ 0, got mean={mean}, sigma={sigma}")
    tau = torch.normal(math.log(mean) - sigma**2 / 2, sigma, (1,), generator=generator)
    rate = (tau.exp() - 1).clamp(min=0)
    r = 1 + int(torch.poisson(rate, generator=generator))
    return max(low, r if high is None else min(r, high))


def linear_schedule(step: int, total: int, start: float, end: float) -> float:
    """start → end linearly over `total` steps, then end (β: 0.1 → 0.05 in Ouro stage I)."""
    if total <= 0:
        return end
    frac = min(max(step / total, 0.0), 1.0)
    return start + (end - start) * frac

"""Exit policies: when does a token stop looping? Pure decisions over per-loop statistics.

    static:N      exactly N loops
    q:0.6         Q-exit: the first loop where the exit CDF reaches q (Ouro; needs an exit gate)
    conv:0.02     fixed point: ‖h_r − h_{r−1}‖ / ‖h_r‖ < tol
    kl:1e-3       successive loops agree: KL(p_r ‖ p_{r−1}) < tol (next-token distributions)
    entropy:1.0   confident: H(p_r) < threshold (nats)

Combine with `|` (exit when any fires) or `&` (when all fire), and bound with `min=N` / `max=N`,
comma-separated: `"q:0.6|conv:0.02,min=2"`. A policy sees a `LoopStats` for the rows still looping
and returns which of them exit now; the engine computes only the statistics a policy asks for
(`needs`), so a policy without logits costs no head evaluation per loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class LoopStats:
    """What is known of N tokens after loop `loop` (1-based) finished."""

    loop: int
    size: int  # N
    device: torch.device | str = "cpu"
    cdf: torch.Tensor | None = None  # (N,) exit CDF up to this loop (gate)
    rel_change: torch.Tensor | None = None  # (N,) ‖h_r − h_{r−1}‖ / ‖h_r‖ (hidden)
    kl: torch.Tensor | None = None  # (N,) KL(p_r ‖ p_{r−1}); +inf at loop 1 (logits)
    entropy: torch.Tensor | None = None  # (N,) H(p_r) in nats (logits)


class ExitPolicy:
    """Base: `fires(stats)` says which tokens may exit; bounds are applied by `exits`."""

    needs: frozenset[str] = frozenset()
    min_loops: int = 1
    max_loops: int | None = None

    def fires(self, stats: LoopStats) -> torch.Tensor:
        raise NotImplementedError

    def forced(self, loop: int, num_loops: int) -> bool | None:
        """The bounds' decision after `loop` of `num_loops`, the same for every token (the last loop always exits,
        none before min_loops), or None where `fires` decides."""
        last = min(num_loops, self.max_loops or num_loops)
        if loop >= last or loop < self.min_loops:
            return loop >= last
        return None

    def exits(self, stats: LoopStats, num_loops: int) -> torch.Tensor:
        """(N,) bool: exit after loop `stats.loop` of `num_loops` (the last loop always exits)."""
        forced = self.forced(stats.loop, num_loops)
        if forced is not None:
            return torch.full((stats.size,), forced, dtype=torch.bool, device=stats.device)
        return self.fires(stats)

    def spec(self) -> str:
        """The policy as a string `parse_exit` reads back, bounds included."""
        bounds = ([f"min={self.min_loops}"] if self.min_loops > 1 else []) + \
            ([f"max={self.max_loops}"] if self.max_loops is not None and not isinstance(self, Static) else [])
        return ",".join([str(self), *bounds])

    def bounded(self, *, min_loops: int | None = None, max_loops: int | None = None) -> ExitPolicy:
        if min_loops is not None:
            self.min_loops = min_loops
        if max_loops is not None:
            self.max_loops = max_loops
        if self.max_loops is not None and self.min_loops > self.max_loops:
            raise ValueError(f"min={self.min_loops} > max={self.max_loops} in exit policy {self}")
        return self


@dataclass
class Static(ExitPolicy):
    loops: int

    def __post_init__(self):
        if self.loops < 1:
            raise ValueError(f"static:{self.loops}: the loop count must be ≥ 1")
        self.max_loops = self.loops
        self.min_loops = 1

    def fires(self, stats: LoopStats) -> torch.Tensor:
        # reached only before max_loops (= loops): a static policy never exits early
        return torch.zeros(stats.size, dtype=torch.bool, device=stats.device)

    def __str__(self) -> str:
        return f"static:{self.loops}"


@dataclass
class Threshold(ExitPolicy):
    """Exit when a per-token statistic crosses `value`: below it, or at least it (`at_least`)."""

    value: float
    name: ClassVar[str] = ""
    stat: ClassVar[str] = ""
    at_least: ClassVar[bool] = False

    def __post_init__(self):
        if not self.value > 0:
            raise ValueError(f"{self.name}:{self.value}: the threshold must be > 0")

    def fires(self, stats: LoopStats) -> torch.Tensor:
        s = getattr(stats, self.stat)
        return s >= self.value if self.at_least else s < self.value

    def __str__(self) -> str:
        return f"{self.name}:{self.value:g}"


class QExit(Threshold):
    """Ouro's Q-exit: the first loop whose exit CDF reaches q."""

    name, stat, at_least, needs = "q", "cdf", True, frozenset({"gate"})

    def __post_init__(self):
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"q:{self.value}: the Q-exit threshold must be in [0, 1]")


class Convergence(Threshold):
    """Fixed point: the hidden state's relative change is below the tolerance."""

    name, stat, needs = "conv", "rel_change", frozenset({"hidden"})


class KLAgreement(Threshold):
    """Successive loops agree: KL(p_r ‖ p_{r−1}) below the tolerance."""

    name, stat, needs = "kl", "kl", frozenset({"logits"})


class Entropy(Threshold):
    """Confident: the next-token entropy (nats) is below the threshold."""

    name, stat, needs = "entropy", "entropy", frozenset({"logits"})


@dataclass
class Combined(ExitPolicy):
    parts: list[ExitPolicy] = field(default_factory=list)
    mode: str = "any"  # "any": exit when one part fires; "all": when every part fires

    def __post_init__(self):
        self.needs = frozenset().union(*(p.needs for p in self.parts))

    def fires(self, stats):
        votes = [p.exits(stats, num_loops=10**9) for p in self.parts]  # parts' own bounds apply
        out = votes[0]
        for v in votes[1:]:
            out = (out | v) if self.mode == "any" else (out & v)
        return out

    def __str__(self):
        return ("|" if self.mode == "any" else "&").join(str(p) for p in self.parts)


_KINDS = {"static": (Static, int), "q": (QExit, float), "conv": (Convergence, float),
          "kl": (KLAgreement, float), "entropy": (Entropy, float)}


def parse_exit(spec: str | ExitPolicy | int | None, *, default_loops: int | None = None) -> ExitPolicy:
    """An ExitPolicy from a string like "q:0.6|conv:0.02,min=2" (or an int: static; None: static default)."""
    if isinstance(spec, ExitPolicy):
        return spec
    if spec is None:
        if default_loops is None:
            raise ValueError("no exit policy and no default loop count")
        return Static(default_loops)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return Static(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"exit policy must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    bounds: dict[str, int] = {}
    expr = []
    for p in parts:
        if p.startswith(("min=", "max=")):
            key, _, value = p.partition("=")
            try:
                bounds[key] = int(value)
            except ValueError:
                raise ValueError(f"exit policy {spec!r}: {p!r} needs an integer") from None
            if bounds[key] < 1:
                raise ValueError(f"exit policy {spec!r}: {p!r} must be ≥ 1")
        else:
            expr.append(p)
    if len(expr) != 1:
        raise ValueError(f"exit policy {spec!r}: expected one expression plus optional min=/max=, got {expr}")
    text = expr[0]
    if "|" in text and "&" in text:
        raise ValueError(f"exit policy {spec!r}: mix of '|' and '&' is ambiguous; use one")
    sep, mode = ("|", "any") if "|" in text else ("&", "all")
    atoms = [_parse_atom(a.strip(), spec) for a in text.split(sep)]
    policy = atoms[0] if len(atoms) == 1 else Combined(atoms, mode)
    return policy.bounded(min_loops=bounds.get("min"), max_loops=bounds.get("max"))


def _parse_atom(text: str, spec: str) -> ExitPolicy:
    name, colon, value = text.partition(":")
    if name not in _KINDS:
        raise ValueError(f"exit policy {spec!r}: unknown policy {name!r}; choose one of {sorted(_KINDS)}")
    if not colon or not value:
        raise ValueError(f"exit policy {spec!r}: {name!r} needs a value, e.g. {name}:{'4' if name == 'static' else '0.5'}")
    cls, typ = _KINDS[name]
    try:
        number = typ(value)
    except ValueError:
        raise ValueError(f"exit policy {spec!r}: {value!r} is not a valid {typ.__name__} for {name!r}") from None
    if typ is float and not math.isfinite(number):
        raise ValueError(f"exit policy {spec!r}: {value!r} must be finite")
    return cls(number)


# --------------------------------------------------------------------------- statistics (pure)


def relative_change(h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """‖h − prev‖ / ‖h‖ over the last dim, in fp32."""
    h, prev = h.float(), prev.float()
    return (h - prev).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)


def kl_divergence(logp: torch.Tensor, prev_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ prev) over the last dim from log-probabilities."""
    return (logp.exp() * (logp - prev_logp)).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def gate_update(cdf: torch.Tensor, survival: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One loop of the exit CDF in fp32: cdf + λ·S, S·(1 − λ). Elementwise, so a token's values are the same
    whether it is updated alone or stacked with others (the engine batches its decoding tokens)."""
    lam = lam.float()
    return cdf + lam * survival, survival * (1 - lam)


class LoopTracker:
    """Per-token running statistics across loops, for the tokens still looping.

    The exit CDF is accumulated as Σ_{j≤r} λ_j·S_{j−1} (the order of Ouro's reference cumsum), so Q-exit
    decisions match the reference bit for bit. `keep(mask)` drops tokens that exited.
    """

    def __init__(self, policy: ExitPolicy, size: int, device: torch.device | str, *, start_hidden=None):
        self.policy, self.size, self.device = policy, size, device
        self.survival = torch.ones(size, device=device)  # S_{r-1}
        self.cdf = torch.zeros(size, device=device)
        self.prev_hidden = start_hidden  # (N, D): the core's input for loop 1's relative change
        self.prev_logp: torch.Tensor | None = None

    def step(self, loop: int, *, hidden=None, lam=None, logits=None) -> LoopStats:
        stats = LoopStats(loop=loop, size=self.size, device=self.device)
        if "gate" in self.policy.needs:
            if lam is None:
                raise ValueError(f"exit policy {self.policy} needs an exit gate; this model has none")
            self.cdf, self.survival = gate_update(self.cdf, self.survival, lam)
            stats.cdf = self.cdf
        if "hidden" in self.policy.needs:
            stats.rel_change = relative_change(hidden, self.prev_hidden)
            self.prev_hidden = hidden
        if "logits" in self.policy.needs:
            logp = torch.log_softmax(logits.float(), dim=-1)
            stats.entropy = entropy(logp)
            stats.kl = (torch.full((self.size,), math.inf, device=self.device) if self.prev_logp is None
                        else kl_divergence(logp, self.prev_logp))
            self.prev_logp = logp
        return stats

    def keep(self, mask: torch.Tensor) -> None:
        self.size = int(mask.sum())
        self.survival, self.cdf = self.survival[mask], self.cdf[mask]
        if self.prev_hidden is not None:
            self.prev_hidden = self.prev_hidden[mask]
        if self.prev_logp is not None:
            self.prev_logp = self.prev_logp[mask]

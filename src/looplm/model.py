"""The looped model, top to bottom: norm → rope → attention → mlp → layer → LoopedLM.

    tokens → embed → prelude → core × R loops → coda → norm → lm_head
                                 ↑ after each loop: optional norm (Ouro), exit gate λ_r = σ(w·h_r + b)

The core's layers exist once; loop r reuses them with the same RoPE positions (DESIGN.md). Module
names follow Hugging Face's Llama/Ouro files so checkpoints load by a prefix strip (`looplm.convert`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING, Callable

from .config import LoopConfig
from .exits import ExitPolicy, Static, parse_exit
from .fused import Projection, can_pack
from .loops import LoopRun

if TYPE_CHECKING:
    from .cache import KVCache


# --------------------------------------------------------------------------- norm


class RMSNorm(nn.Module):
    """RMSNorm scaling by w (Llama, Ouro, Qwen) or by (offset + w) (Gemma: offset 1, weights stored around 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # scales by 1 at init either way
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: the scale in fp32, then the cast (HF Gemma's order, bf16 parity)
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        # statistics in fp32, scale in the input dtype: the order HF Llama and Ouro use (bf16 parity)
        return self.weight * x32.to(dtype)


# --------------------------------------------------------------------------- rope


def rope_inv_freq(config: LoopConfig, *, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (Dh/2,) and the attention scaling for the config's RoPE type.

    Types: default; linear (positions / factor); llama3 (Llama-3.1 band-wise scaling);
    yarn (NTK-by-parts interpolation with a logit temperature, used by Qwen long-context configs).
    local: the sliding layers' table, plain RoPE with base `rope_local_base_freq` (Gemma-3).
    """
    dim = config.head_dim
    base = config.rope_local_base_freq if local else config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = {} if local else (config.rope_scaling or {})
    kind = "default" if local else config.rope_type
    if kind == "default":
        return inv_freq, 1.0
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_ctx = rs.get("original_max_position_embeddings") or config.max_position_embeddings
        beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

            def get_mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if mscale and mscale_all:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
            else:
                attention_factor = get_mscale(factor)

        def correction_dim(rot: float) -> float:
            return (dim * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = correction_dim(beta_fast)
        high = correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        interpolation = inv_freq / factor
        return interpolation * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)
    raise ValueError(f"rope_type={kind!r} is not supported")


class Rotary(nn.Module):
    def __init__(self, config: LoopConfig, *, local: bool = False):
        super().__init__()
        self.local = local
        inv_freq, self.scaling = rope_inv_freq(config, local=local)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) → cos and the signed sin [−sin₁, sin₂] (B, S, 1, Dh) in `dtype` (computed in fp32, like HF;
        the sign is `apply_rope`'s rotate-half folded into the table; the 1 broadcasts over heads, once per
        forward instead of in every layer)."""
        freqs = positions[..., None, None].float() * self.inv_freq.float()  # (B, S, 1, Dh/2)
        cos, sin = (freqs.cos() * self.scaling).to(dtype), (freqs.sin() * self.scaling).to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, Dh); cos and the signed sin (B, S, 1, Dh) of `Rotary`. Half-split rotation (HF's rotate_half):
    x·cos + [−x₂, x₁]·[sin₁, sin₂], computed as x·cos + roll(x)·[−sin₁, sin₂]: the same products bit for bit,
    in four kernels instead of six (decoding at batch 1 is bound by per-kernel overhead outside the matmuls).
    Heads are dim 2, so q and k side by side (the fused q|k|v projection's output) rotate in one call."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# --------------------------------------------------------------------------- attention / mlp


class Attention(nn.Module):
    def __init__(self, config: LoopConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=False)
        if config.qk_norm:  # Qwen3, Gemma-3: normalise each head's q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.rms_norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.rms_norm_offset)
        self.qk_norm = config.qk_norm
        scalar = config.query_pre_attn_scalar
        self.scale = (scalar if scalar is not None else self.head_dim) ** -0.5
        self.sliding = config.is_sliding(layer_idx)
        self.window = config.sliding_window
        self.fast: tuple[Projection, Projection] | None = None  # (q|k|v, o), set by LoopedLM.fuse()

    def forward(self, x: torch.Tensor, ctx: _Context, layer_idx: int, loop_idx: int) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv, self.head_dim
        fast = self.fast if self.fast is not None and not torch.is_grad_enabled() else None
        view = ctx.view(self.sliding)  # a sliding layer's RoPE and mask
        if fast is not None and not self.qk_norm:  # one matmul, and RoPE over q|k at once
            qkv = fast[0](x).view(B, S, H + 2 * Hkv, Dh)
            qk = apply_rope(qkv[:, :, : H + Hkv], view.cos, view.sin)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv :]
        else:
            if fast is not None:
                q, k, v = fast[0](x).split(fast[0].sizes, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k, v = q.view(B, S, H, Dh), k.view(B, S, Hkv, Dh), v.view(B, S, Hkv, Dh)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, view.cos, view.sin), apply_rope(k, view.cos, view.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, Dh), (B, Hkv, S, Dh) ×2
        if ctx.attend is not None:  # a hook stores K/V and attends (the engine's packed step, training's replay)
            y = ctx.attend(self, q, k, v, layer_idx)  # (B, H, S, Dh)
        else:
            if ctx.cache is not None:
                k, v = ctx.cache.update(k, v, layer_idx, loop_idx, rows=ctx.rows)  # (B, Hkv, T, Dh), T = kept + S
            y = self.sdpa(q, k, v, view)  # (B, H, S, Dh)
        y = y.transpose(1, 2).reshape(B, S, -1)
        return fast[1](y) if fast is not None else self.o_proj(y)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: _Attend | _Context) -> torch.Tensor:
        """q (B, H, S, Dh), k and v (B, Hkv, T, Dh) → (B, H, S, Dh) under the view's mask (RoPE applied)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=view.mask, is_causal=view.is_causal, scale=self.scale,
            enable_gqa=self.n_kv != self.n_head,
        )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


class MLP(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        D, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)
        self.act = ACTIVATION_FNS[config.hidden_act]
        self.fast: tuple[Projection, Projection] | None = None  # (gate|up, down), set by LoopedLM.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None and not torch.is_grad_enabled():
            g, u = self.fast[0](x).chunk(2, dim=-1)
            return self.fast[1](self.act(g) * u)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm (Llama, Qwen) or sandwich-norm (Ouro, Gemma-3) transformer layer.

    pre:      h = x + attn(n1(x));            y = h + mlp(n3(h))
    sandwich: h = x + n2(attn(n1(x)));        y = h + n4(mlp(n3(h)))
    with n1..n4 = input_layernorm, input_layernorm_2, post_attention_layernorm, post_attention_layernorm_2
    (Gemma-3's input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm).
    """

    def __init__(self, config: LoopConfig, layer_idx: int = 0):
        super().__init__()
        D, eps, offset = config.hidden_size, config.rms_norm_eps, config.rms_norm_offset
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(D, eps, offset)
        self.post_attention_layernorm = RMSNorm(D, eps, offset)
        self.sandwich = config.norm_style == "sandwich"
        if self.sandwich:
            self.input_layernorm_2 = RMSNorm(D, eps, offset)
            self.post_attention_layernorm_2 = RMSNorm(D, eps, offset)

    def forward(self, x: torch.Tensor, ctx: _Context, layer_idx: int, loop_idx: int) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), ctx, layer_idx, loop_idx)
        h = x + (self.input_layernorm_2(a) if self.sandwich else a)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + (self.post_attention_layernorm_2(m) if self.sandwich else m)


# --------------------------------------------------------------------------- outputs and helpers


@dataclass
class _Attend:
    """How sliding-window layers attend: their RoPE tables and mask (keys: the positions their cache keeps)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool

    def select(self, rows: torch.Tensor) -> _Attend:
        return _Attend(self.cos[rows], self.sin[rows], None if self.mask is None else self.mask[rows], self.is_causal)


@dataclass
class _Context:
    """What every layer of one forward shares: rotary tables, the mask, the cache (for full-attention
    layers; `sliding` holds the sliding-window layers' own, None when the model has none)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, S, T) bool, True = may attend; None with is_causal or no padding
    is_causal: bool
    cache: KVCache | None
    rows: torch.Tensor | None = None  # the cache's batch rows computed (None: all); the rest stopped looping
    sliding: _Attend | None = None
    # a hook attend(attention, q, k, v, layer_idx) → y (B, H, S, Dh) that stores K/V and attends in the
    # layer's place (RoPE applied): the engine's packed step of many requests (looplm.batching; x is (1, N, D),
    # every row's tokens side by side), the training objective's K/V replay (looplm.train.objective)
    attend: Callable[..., torch.Tensor] | None = None

    def view(self, sliding: bool) -> _Attend | _Context:
        """The RoPE tables and mask a layer attends with: a sliding-window layer's own when the model has them."""
        return self.sliding if sliding and self.sliding is not None else self

    def select(self, rows: torch.Tensor) -> _Context:
        """The context of a subset of its rows (indices into this context's batch); the hook is dropped."""
        return _Context(self.cos[rows], self.sin[rows], None if self.mask is None else self.mask[rows],
                        self.is_causal, self.cache, rows if self.rows is None else self.rows[rows],
                        None if self.sliding is None else self.sliding.select(rows))


@dataclass
class LoopOutput:
    logits: torch.Tensor  # (B, S, V) read out at the last loop run
    # (R, B, S, V) with return_loops. With a coda, loop r's readout runs the coda on loop r's hidden
    # state of the new positions; cached past positions are seen through the coda KV of their own exit.
    loop_logits: torch.Tensor | None = None
    loop_hidden: torch.Tensor | None = None  # (R, B, S, D) each loop's output (after the loop norm), with return_loops
    exit_pdf: torch.Tensor | None = None  # (B, S, R) p(exit at loop r) when the model has an exit gate
    exit_lambda: torch.Tensor | None = None  # (B, S, R) λ_r = σ(gate(h_r)) when gated
    exit_loop: torch.Tensor | None = None  # (B, S) the loop (1-based) each position's logits come from, with exit=


def exit_distribution(lam: torch.Tensor) -> torch.Tensor:
    """Exit pdf from per-loop exit probabilities λ (..., R) (Ouro, arXiv 2510.25741 §3):

    S_r = Π_{j≤r} (1 − λ_j);  p(r) = λ_r · S_{r−1} for r < R;  p(R) = S_{R−1}.  Sums to 1.
    """
    survive = torch.cumprod(1 - lam, dim=-1)  # S_r
    prev = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)  # S_{r-1}
    pdf = lam * prev
    return torch.cat([pdf[..., :-1], prev[..., -1:]], dim=-1)


# --------------------------------------------------------------------------- the model


class LoopedLM(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps, config.rms_norm_offset)
        self.early_exit_gate = nn.Linear(D, 1) if config.exit_gate else None
        self.injection = nn.Linear(2 * D, D, bias=False) if config.injection == "concat" else None
        self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fast_head: Projection | None = None  # set by fuse()
        self.reset_rotary()
        self.apply(self._init_weights)

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables (non-persistent buffers): one for full layers, one for sliding layers
        when their base differs (Gemma-3: 10k local, 1M global)."""
        local = self.config.has_sliding and self.config.rope_local_base_freq is not None
        self.rotary = Rotary(self.config)
        self.rotary_local = Rotary(self.config, local=True) if local else None
        if device is not None:
            self.rotary.to(device)
            if local:
                self.rotary_local.to(device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # layer groups (views into self.layers: the weights exist once)
    @property
    def prelude(self) -> list[Layer]:  # (indexing, not slicing: a ModuleList slice builds a new module per call)
        return [self.layers[i] for i in range(self.config.num_prelude_layers)]

    @property
    def core(self) -> list[Layer]:
        P = self.config.num_prelude_layers
        return [self.layers[i] for i in range(P, P + self.config.num_core_layers)]

    @property
    def coda(self) -> list[Layer]:
        return [self.layers[i] for i in range(self.config.num_prelude_layers + self.config.num_core_layers,
                                              len(self.layers))]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def weight_bytes(self) -> int:
        """Bytes of unique parameters (a tied head and the looped core count once)."""
        seen, total = set(), 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def resolve_loops(self, num_loops: int | None) -> int:
        R = self.config.num_loops if num_loops is None else num_loops
        if not isinstance(R, int) or isinstance(R, bool) or R < 1:
            raise ValueError(f"num_loops must be an integer ≥ 1, got {num_loops!r}")
        return R

    def resolve_budget(self, num_loops: int | None, exit: str | ExitPolicy | None) -> tuple[int, ExitPolicy | None]:
        """(R, policy): R = num_loops (default the config's), capped by the policy's max; a static
        policy becomes plain R (policy None), which needs no per-loop statistics."""
        if exit is None:
            return self.resolve_loops(num_loops), None
        policy = parse_exit(exit)
        R = self.resolve_loops(num_loops)
        if policy.max_loops is not None:
            R = policy.max_loops if num_loops is None else min(R, policy.max_loops)
        if isinstance(policy, Static):
            return R, None
        if "gate" in policy.needs and self.early_exit_gate is None:
            raise ValueError(f"exit policy {str(exit)!r} needs an exit gate; this model has none (exit_gate=False)")
        if policy.min_loops > R:
            raise ValueError(f"exit policy {str(exit)!r}: min={policy.min_loops} > the {R} loops run")
        return R, policy

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        num_loops: int | None = None,
        exit: str | ExitPolicy | None = None,
        cache: KVCache | None = None,
        return_loops: bool = False,
        logits_to_keep: int = 0,
    ) -> LoopOutput:
        """Run the pipeline on input_ids (B, S).

        attention_mask (B, S): 1 for tokens, 0 for (left) padding of the *new* tokens; the cache keeps
        the mask of the past. exit: an exit policy ("q:0.5", "conv:0.02", ...): every position still
        runs every loop (as in prefill), and its logits are read out at its own exit loop
        (`out.exit_loop`). cache: a `KVCache`; its strategy decides what later tokens see of earlier
        loops (docs/architecture.md). logits_to_keep: logits for the last k positions only (0 = all).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        R, policy = self.resolve_budget(num_loops, exit)
        ctx = self.context(input_ids, attention_mask, cache, R)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)

        x = self.embed(input_ids, ctx)  # (B, S, D); re-injected each loop when configured
        # per-loop logits with return_loops (every position's when the exit policy reads them)
        run = LoopRun(self, x, ctx, R, policy=policy, logits=keep if return_loops else None)
        hidden, lambdas, loop_logits = [], [], []
        for loop in run:  # every position runs every loop (as in prefill); each keeps its own exit
            if loop.lam is not None:
                lambdas.append(loop.lam)
            if return_loops:
                hidden.append(loop.hidden)
                loop_logits.append(loop.logits[:, keep])

        out = LoopOutput(logits=None)  # type: ignore[arg-type]
        if return_loops:
            out.loop_hidden = torch.stack(hidden)  # (R, B, S, D)
            out.loop_logits = torch.stack(loop_logits)  # (R, B, S, V)
        if policy is not None:
            out.exit_loop = run.exit_loop
        if return_loops and policy is None:
            out.logits = out.loop_logits[-1]
        else:  # each position's own exit state; the coda runs last on these states, so its cache holds them
            out.logits = self.readout(run.exit_hidden, ctx, keep)
        if lambdas:
            out.exit_lambda = torch.stack(lambdas, dim=-1)  # (B, S, R)
            out.exit_pdf = exit_distribution(out.exit_lambda)
        if cache is not None:
            cache.commit()
        return out

    # pieces of the pipeline, also driven loop by loop by the engine

    def fuse(self, pack: bool | None = None) -> None:
        """Fuse q|k|v and gate|up into one matmul each, and on a CPU whose oneDNN packs this dtype, pack every
        projection and the head (`looplm.fused`; pack=None decides). Used with autograd off; idempotent."""
        pack = can_pack(self.device.type, self.dtype) if pack is None else pack
        if self.fast_head is not None and self._fuse_pack == pack and self.fused_fresh():
            return
        projections = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            a.fast = Projection([a.q_proj, a.k_proj, a.v_proj], pack=pack), Projection([a.o_proj], pack=pack)
            m.fast = Projection([m.gate_proj, m.up_proj], pack=pack), Projection([m.down_proj], pack=pack)
            projections += [*a.fast, *m.fast]
        self.fast_head = Projection([self.lm_head], pack=pack)
        projections.append(self.fast_head)
        self._fuse_pack, self._fast_packed = pack, any(p.packed for p in projections)
        self._fast_params = [p for proj in projections for lin in proj.linears for p in lin.parameters(recurse=False)]
        self._fast_stamp = self._fused_stamp()

    def unfuse(self) -> None:
        """Drop fused projections (packed copies are freed; unpacked views stay views of one storage)."""
        for layer in self.layers:
            layer.self_attn.fast = layer.mlp.fast = None
        self.fast_head = None

    def _fused_stamp(self) -> list:
        if self._fast_packed:  # a packed copy goes stale on any write; unpacked views only when replaced
            return [(p.data_ptr(), p._version) for p in self._fast_params]
        return [p.data_ptr() for p in self._fast_params]

    def fused_fresh(self) -> bool:
        """False once a fused parameter was replaced (`.to()`, `load_state_dict(assign=True)`) or, when packed,
        written in place since `fuse()`."""
        return self.fast_head is None or self._fused_stamp() == self._fast_stamp

    def embed(self, input_ids: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """Token embedding then the prelude: (B, S) → (B, S, D)."""
        if self.fast_head is not None and not self.fused_fresh():  # parameters changed since fuse(): rebuild
            self.fuse(self._fuse_pack)
        x = self.token_embedding(input_ids)
        for i, layer in enumerate(self.prelude):
            x = layer(x, ctx, i, 0)
        return x

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:  # Gemma: × √D, the factor rounded to the model's dtype as HF does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        return x

    def core_loop(self, x: torch.Tensor, e: torch.Tensor, ctx: _Context, loop_idx: int, *,
                  block: tuple[int, int] | None = None,
                  on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """One loop: injection (loops ≥ 2), the core layers, the loop norm. (B, S, D) → (B, S, D).

        block: the layers [i, j) to run instead of the core (the retrofit search tries blocks of a plain model).
        on_layer(loop_idx, layer_idx, x_in, x_out): called after each layer (analysis reads inside a loop).
        Loops are driven by `looplm.loops.LoopRun`; the engine (`looplm.batching`) calls this once per step.
        """
        cfg = self.config
        first, end = block or (cfg.num_prelude_layers, cfg.num_prelude_layers + cfg.num_core_layers)
        x = self.inject(x, e, loop_idx)
        for layer_idx in range(first, end):
            y = self.layers[layer_idx](x, ctx, layer_idx, loop_idx)
            if on_layer is not None:
                on_layer(loop_idx, layer_idx, x, y)
            x = y
        return self.norm(x) if cfg.loop_norm else x

    def inject(self, x: torch.Tensor, e: torch.Tensor, loop_idx: int) -> torch.Tensor:
        """Re-inject the prelude output e at loops ≥ 2: x + e ("add") or Linear([x, e]) ("concat")."""
        if loop_idx == 0 or self.config.injection == "none":
            return x
        return x + e if self.injection is None else self.injection(torch.cat([x, e], dim=-1))

    def exit_lambda(self, h: torch.Tensor) -> torch.Tensor | None:
        """λ = σ(gate(h)) in fp32, (..., D) → (...); None without a gate."""
        if self.early_exit_gate is None:
            return None
        return torch.sigmoid(self.early_exit_gate(h).squeeze(-1).float())

    def readout(self, h: torch.Tensor, ctx: _Context, keep: slice = slice(None)) -> torch.Tensor:
        """Exit at a loop: h through the coda, the final norm and the head (DESIGN.md).

        The coda sees every position (its KV is cached); only the `keep` positions reach the head.
        With loop_norm and no coda, h is already the norm's output (Ouro) and is not normed twice.
        """
        if not self.coda and self.config.loop_norm:
            return self.softcap(self.head(h[:, keep]))
        base = self.config.num_prelude_layers + self.config.num_core_layers
        for i, layer in enumerate(self.coda):
            h = layer(h, ctx, base + i, 0)
        return self.softcap(self.head(self.norm(h[:, keep])))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head: (..., D) → (..., V). On CPU, a few rows against a large vocabulary run as W @ hᵀ: oneDNN's
        F.linear repacks the whole head per call for small M (SmolLM2, 49k × 576 fp32 on 2 cores: 42–47 ms
        for 4–16 rows, against 13–28 ms this way; one row is a matrix-vector product either way)."""
        if self.fast_head is not None and self.fast_head.packed and not torch.is_grad_enabled():
            return self.fast_head(h)
        w = self.lm_head.weight
        rows = h.reshape(-1, h.shape[-1])
        if rows.device.type == "cpu" and 1 < rows.shape[0] <= 64 and w.shape[0] > 8 * w.shape[1]:
            return (w @ rows.T).T.contiguous().reshape(*h.shape[:-1], w.shape[0])
        return self.lm_head(h)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.config.final_logit_softcapping
        return logits if c is None else torch.tanh(logits / c) * c

    def context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: KVCache | None, R: int) -> _Context:
        """What every layer of a forward over input_ids shares: RoPE tables for each row's positions, the
        attention masks, the cache (`begin()` is called on it here; the caller commits)."""
        B, S = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        new_valid = (
            torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.to(device=input_ids.device, dtype=torch.bool)
        )
        if cache is None:
            past, positions = 0, (new_valid.long().cumsum(1) - 1).clamp(min=0)
            key_valid = new_valid
        else:
            past = cache.length
            positions, key_valid = cache.begin(new_valid, num_loops=R)  # (B, S), (B, past + S)
        limit = self.config.max_position_embeddings
        if positions.numel() and int(positions.max()) + 1 > limit:  # per row: left padding takes no position
            raise ValueError(
                f"sequence length {int(positions.max()) + 1} (past {past} + new {S}) exceeds the position limit "
                f"max_position_embeddings={limit}"
            )
        cos, sin = self.rotary(positions, self.dtype)
        ctx = _Context(cos, sin, *self._mask(key_valid, past, past, S), cache)
        if self.config.has_sliding:
            # a sliding layer's keys are the positions its cache keeps (the last window − 1) and the new ones
            kept = past if cache is None else cache.sliding_kept
            cos_l, sin_l = (cos, sin) if self.rotary_local is None else self.rotary_local(positions, self.dtype)
            if kept == past and past + S <= self.config.sliding_window:  # the window does not bind
                ctx.sliding = _Attend(cos_l, sin_l, ctx.mask, ctx.is_causal)
            else:
                mask, _ = self._mask(key_valid[:, past - kept :], kept, past, S, window=self.config.sliding_window)
                ctx.sliding = _Attend(cos_l, sin_l, mask, False)
        return ctx

    @staticmethod
    def _mask(key_valid: torch.Tensor, kept: int, past: int, S: int,
              window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask (B, 1, S, kept + S) or None, is_causal) for S new positions after `past` ones, of which the
        keys hold the last `kept`. Key columns are cache positions: a left-padded row's tokens are contiguous,
        so a column distance is a position distance. window: a query sees keys less than `window` back."""
        dev = key_valid.device
        all_valid = bool(key_valid.all())
        if window is None and all_valid and (past == 0 or S == 1):
            return None, past == 0 and S > 1
        q_pos = torch.arange(past, past + S, device=dev)[:, None]  # (S, 1)
        k_pos = torch.arange(past - kept, past + S, device=dev)[None, :]  # (1, kept + S)
        allowed = k_pos <= q_pos  # (S, T)
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        # a padded query attends to itself so no row is all -inf (NaN would leak into its K/V)
        mask = allowed[None] & (key_valid[:, None, :] | (k_pos == q_pos)[None])  # (B, S, T)
        return mask[:, None], False

    def packed_context(self, positions: torch.Tensor, mask: torch.Tensor) -> _Context:
        """A cache-free context from explicit RoPE positions (B, S) and a mask (B, 1, S, S) (packed items):
        sliding layers see the keys of `mask` less than a window back in position."""
        cos, sin = self.rotary(positions, self.dtype)
        ctx = _Context(cos, sin, mask, False, None)
        if self.config.has_sliding:
            cos_l, sin_l = (cos, sin) if self.rotary_local is None else self.rotary_local(positions, self.dtype)
            near = (positions[:, :, None] - positions[:, None, :]) < self.config.sliding_window  # (B, S, S)
            ctx.sliding = _Attend(cos_l, sin_l, mask & near[:, None], False)
        return ctx

"""One flat config for every looped model: embed → prelude → core × R → coda → norm → lm_head.

Field names reuse Hugging Face's (`hidden_size`, `num_key_value_heads`, `rope_theta`, ...) so that
converting a Llama/Qwen2/Ouro config is a plain rename (see `looplm.convert`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORM_STYLES = ("pre", "sandwich")
INJECTIONS = ("none", "add", "concat")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # Llama/Qwen; Gemma's tanh-approximated GELU
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LoopConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    # the pipeline: layers [0, P) prelude, [P, P+C) core (run num_loops times), [P+C, P+C+K) coda
    num_prelude_layers: int = 0
    num_core_layers: int = 30
    num_coda_layers: int = 0
    num_loops: int = 1  # default R when a call does not say
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's dict: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = True
    # "pre": Llama (x + attn(norm(x))). "sandwich": Ouro, a second norm on each sublayer's output.
    norm_style: str = "pre"
    # Ouro runs the final norm after every loop; its output is the next loop's input, the gate input
    # and the head input (DESIGN.md, "Key semantics").
    loop_norm: bool = False
    exit_gate: bool = False  # Linear(D, 1) on each loop's output: λ_r = σ(gate(h_r))
    # how the prelude output e re-enters loops r ≥ 2: "add" (h + e) or "concat" (Linear(2D→D) on [h, e])
    injection: str = "none"
    attention_bias: bool = False  # bias on q/k/v (Qwen2 has it; o_proj never does)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Qwen3 and Gemma-3 are the same pipeline with these options (issue 12): data, not code paths
    qk_norm: bool = False  # an RMSNorm over each head's q and k before RoPE (self_attn.q_norm / k_norm)
    # Gemma stores norm weights as offsets from 1 and scales by (offset + w), statistics and scale in fp32
    rms_norm_offset: float = 0.0
    embed_scale: float = 1.0  # Gemma multiplies the embeddings by √hidden_size (in the model's dtype)
    query_pre_attn_scalar: float | None = None  # attention scale = this^-1/2 (Gemma-3: 256); None: head_dim
    final_logit_softcapping: float | None = None  # logits = c·tanh(logits / c) (Gemma-2 style; Gemma-3: None)
    # per layer, "full_attention" or "sliding_attention" (HF's names). None: all full, or all sliding when
    # sliding_window is set (Mistral's convention). A sliding layer's query attends to the last
    # `sliding_window` positions (itself included), in prefill and through the cache, which keeps only those.
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rope_local_base_freq: float | None = None  # RoPE base of sliding layers (Gemma-3: 10k; full layers: rope_theta)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # where the weights came from (model_type, path, ...): recorded in saved dirs
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_core_layers", "max_position_embeddings")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("num_prelude_layers", "num_coda_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.num_loops < 1:
            raise ValueError(f"num_loops must be ≥ 1, got {self.num_loops}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _check_choice("norm_style", self.norm_style, NORM_STYLES)
        _check_choice("injection", self.injection, INJECTIONS)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        if self.rope_scaling is not None:
            _check_choice("rope_scaling.rope_type", self.rope_type, ROPE_TYPES)
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ValueError(f"sliding_window must be ≥ 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            for t in self.layer_types:
                _check_choice("layer_types[...]", t, LAYER_TYPES)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
            raise ValueError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError(f"final_logit_softcapping must be > 0 or None, got {self.final_logit_softcapping}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def num_layers(self) -> int:
        """Unique layers held in memory (the core counts once however many loops run)."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    def is_sliding(self, layer_idx: int) -> bool:
        """Does this layer attend through a sliding window (of `sliding_window` positions)?"""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer_idx] == "sliding_attention"

    @property
    def has_sliding(self) -> bool:
        return any(self.is_sliding(i) for i in range(self.num_layers))

    def is_core(self, layer_idx: int) -> bool:
        return self.num_prelude_layers <= layer_idx < self.num_prelude_layers + self.num_core_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> LoopConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown LoopConfig keys {unknown[:8]}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> LoopConfig:
        path = Path(path)
        d = json.loads(path.read_text())
        d.pop("model_type", None)
        d.pop("architectures", None)
        d.pop("looplm_version", None)
        return cls.from_dict(d, where=str(path))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")

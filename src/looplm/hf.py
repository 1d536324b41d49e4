"""Hugging Face integration: `AutoModelForCausalLM.from_pretrained(looplm_dir)` after `import looplm.hf`.

Importing this module registers looplm with transformers' Auto classes; `looplm.load`, `looplm.save`,
`looplm.LoopLMConfig` and `looplm.LoopLMForCausalLM` import it (plain `import looplm` does not: it stays fast).

The wrapper holds a `LoopedLM` as `self.model`, so a looplm dir's tensor names (`model.*`, written by
`looplm.save`) are this class's own. HF `generate()` runs at static depth (`config.num_loops`, or
`num_loops=` passed to generate; `exit=` applies a policy as a full forward does) without a KV cache: every step re-reads the whole sequence, which is
exact but quadratic. For fast generation, per-request loops and loop-aware caches use `looplm.generate`.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import LoopConfig
from .model import LoopedLM, RMSNorm, Rotary, rope_inv_freq

_FIELDS = [f.name for f in dataclasses.fields(LoopConfig)]
# transformers ≥ 5 renamed rope_scaling to rope_parameters (the old name, a property now, warns when set)
_ROPE_ATTR = "rope_parameters" if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property) else "rope_scaling"


class LoopLMConfig(PretrainedConfig):
    model_type = "looplm"

    def __init__(self, **kwargs):
        loop = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        cfg = LoopConfig(**loop)  # validates
        for k in _FIELDS:
            if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
                setattr(self, _ROPE_ATTR if k == "rope_scaling" else k, getattr(cfg, k))
        kwargs.setdefault("use_cache", False)  # see the module docstring
        super().__init__(
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
            **kwargs,
        )

    def to_loop_config(self) -> LoopConfig:
        return LoopConfig(**{k: getattr(self, k) for k in _FIELDS})


class LoopLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LoopLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]
    _supports_sdpa = True
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.model = LoopedLM(config.to_loop_config())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, Rotary):  # a non-persistent buffer: HF leaves it empty when loading
            inv_freq, module.scaling = rope_inv_freq(self.config.to_loop_config(), local=module.local)
            module.inv_freq.copy_(inv_freq)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0 - module.offset)
        else:
            LoopedLM._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no HF cache: see the module docstring

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, num_loops=None, exit=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "num_loops": num_loops, "exit": exit}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_loops: int | None = None,
        exit: str | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF-style forward; `num_loops` and `exit` (an exit policy string) are looplm's budgets."""
        out = self.model(input_ids, attention_mask=attention_mask, num_loops=num_loops, exit=exit,
                         logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)


def register() -> None:
    AutoConfig.register("looplm", LoopLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)


register()  # importing looplm.hf is what makes transformers know looplm dirs

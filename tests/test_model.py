"""The pipeline at static depth: cache on ≡ cache off, left padding ≡ alone, shared weights, bad input."""

import pytest
import torch

import looplm
from conftest import tiny_model

SHAPES = {
    "plain-llama": dict(num_prelude_layers=0, num_coda_layers=0, num_loops=1),
    "core-only-looped": dict(num_prelude_layers=0, num_coda_layers=0),
    "prelude-core-coda": dict(),
    "ouro-like": dict(num_prelude_layers=0, num_coda_layers=0, norm_style="sandwich", loop_norm=True, exit_gate=True),
    "gate+coda+loopnorm": dict(loop_norm=True, exit_gate=True, norm_style="sandwich"),
    "inject-add": dict(injection="add"),
    "inject-concat+gate": dict(injection="concat", exit_gate=True),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-qkv-bias": dict(num_key_value_heads=1, attention_bias=True),
    # Gemma-3's options (issue 12) with a window of 4 < the 11 positions: sliding layers in prelude, core and coda
    "gemma-like": dict(norm_style="sandwich", qk_norm=True, rms_norm_offset=1.0, embed_scale=32**0.5,
                       hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=12.0, sliding_window=4,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                       rope_local_base_freq=100.0, final_logit_softcapping=5.0, exit_gate=True),
}


def incremental_logits(model, ids, mask, *, R, prefill, strategy="per_loop"):
    """Prefill `prefill` positions, then one position at a time, through a KVCache."""
    B, S = ids.shape
    cache = looplm.KVCache(model.config, batch_size=B, max_len=S, num_loops=R, strategy=strategy)
    outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], num_loops=R, cache=cache, return_loops=True)]
    for t in range(prefill, S):
        outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], num_loops=R, cache=cache, return_loops=True))
    return torch.cat([o.loop_logits for o in outs], dim=2), torch.cat([o.logits for o in outs], dim=1)


@pytest.mark.parametrize("name", list(SHAPES))
def test_per_loop_cache_equals_cache_free_forward(name):
    model = tiny_model(**SHAPES[name])
    R = model.config.num_loops
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(ids, num_loops=R, return_loops=True)
        inc, inc_last = incremental_logits(model, ids, mask, R=R, prefill=5)
    torch.testing.assert_close(inc_last, full.logits, atol=1e-5, rtol=1e-5)
    if not model.coda:  # with a coda, a cached past is read through the coda KV of its own exit (loop R)
        torch.testing.assert_close(inc, full.loop_logits, atol=1e-5, rtol=1e-5)
    if model.config.exit_gate:
        assert full.exit_pdf.shape == (2, 11, R)
        torch.testing.assert_close(full.exit_pdf.sum(-1), torch.ones(2, 11))
    else:
        assert full.exit_pdf is None


@pytest.mark.parametrize("name", ["prelude-core-coda", "ouro-like", "inject-concat+gate", "gemma-like"])
@pytest.mark.parametrize("strategy", looplm.cache.STRATEGIES)
def test_left_padded_batch_equals_each_prompt_alone(name, strategy):
    model = tiny_model(**SHAPES[name])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (7, 3, 5)]
    with torch.no_grad():
        batch = looplm.generate(model, prompts, max_new_tokens=6, kv=strategy, stop_tokens=[])
        for i, p in enumerate(prompts):
            alone = looplm.generate(model, [p], max_new_tokens=6, kv=strategy, stop_tokens=[])
            assert batch.new_tokens[i] == alone.new_tokens[0], f"row {i} ({strategy})"
        # logits too, not just argmax: padded rows of a cache-free forward equal the prompt alone
        ids, mask = looplm.engine.left_pad(prompts, pad_token_id=0)
        full = model(ids, attention_mask=mask, return_loops=True)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]), return_loops=True)
            torch.testing.assert_close(full.loop_logits[:, i, -len(p):], alone.loop_logits[:, 0], atol=1e-5, rtol=1e-5)


def test_padded_prefill_then_decode_matches_cache_free():
    model = tiny_model(**SHAPES["gate+coda+loopnorm"])
    ids, mask = looplm.engine.left_pad([[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]], pad_token_id=0)
    ids = torch.cat([ids, torch.tensor([[12, 13, 14], [4, 5, 6]])], dim=1)
    mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_loops=True)
        _, inc = incremental_logits(model, ids, mask, R=3, prefill=7)
    valid = mask.bool()
    torch.testing.assert_close(inc[valid], full.logits[valid], atol=1e-5, rtol=1e-5)


def test_core_weights_exist_once():
    model = tiny_model()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 61, (1, 4))
    with torch.no_grad():
        a, b = model(ids, num_loops=1).logits, model(ids, num_loops=8).logits
    assert not torch.allclose(a, b)  # more loops compute something else ...
    assert sum(p.numel() for p in model.parameters()) == n_params  # ... with the same weights
    assert len(model.layers) == 4 and model.core[0] is model.layers[1]


def test_more_loops_equal_the_core_run_again_by_hand():
    """R loops ≡ composing the core R times (no injection, no loop norm): the shape of the pipeline."""
    model = tiny_model(num_prelude_layers=0, num_coda_layers=0, num_core_layers=1)
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        out = model(ids, num_loops=3, return_loops=True)
        ctx = model.context(ids, None, None, 3)
        x = model.embed_tokens(ids)
        for r in range(3):
            x = model.layers[0](x, ctx, 0, r)
            torch.testing.assert_close(out.loop_logits[r], model.lm_head(model.norm(x)))


def test_exit_distribution_by_hand():
    lam = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.3], [1.0, 0.2, 0.7]])
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.81, 0.09], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(looplm.exit_distribution(lam), expected)


def test_bfloat16_runs_and_tracks_float32():
    model = tiny_model()
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_num_loops_must_be_a_positive_int(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="num_loops"):
        model(torch.zeros(1, 3, dtype=torch.long), num_loops=bad)


def test_sequence_longer_than_the_position_limit():
    model = tiny_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="position limit"):
        looplm.generate(model, [[1] * 17], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens=8"):
        looplm.generate(model, [[1] * 10], max_new_tokens=8)


@pytest.mark.parametrize("field,value", [("norm_style", "post"), ("injection", "mul"), ("num_loops", 0),
                                         ("num_key_value_heads", 3), ("hidden_act", "relu")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_model(**{field: value})

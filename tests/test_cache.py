"""KV strategies on hand-built values: what each stores, what later tokens read, what it costs."""

import pytest
import torch

import looplm
from conftest import tiny_config, tiny_model

R = 3
CORE = 1  # layer index of the single core layer (prelude 1, core 1, coda 1)


def cache_for(strategy, *, num_loops=R, max_len=8):
    cfg = tiny_config(num_core_layers=1, num_key_value_heads=1, num_attention_heads=1, hidden_size=4,
                      intermediate_size=4, head_dim=2)
    return looplm.KVCache(cfg, batch_size=1, max_len=max_len, num_loops=num_loops, strategy=strategy)


def kv(value, S=1):
    """K = V = `value` everywhere, shape (B=1, Hkv=1, S, Dh=2)."""
    return torch.full((1, 1, S, 2), float(value))


def run_step(cache, S, loops, value_of_loop):
    """One forward's worth of core writes; returns what attention saw at each loop (K over all positions)."""
    cache.begin(torch.ones(1, S, dtype=torch.bool), num_loops=loops)
    seen = []
    for r in range(loops):
        k, _ = cache.update(kv(value_of_loop(r), S), kv(value_of_loop(r), S), CORE, r)
        seen.append(k[0, 0, :, 0].tolist())
    cache.commit()
    return seen


@pytest.mark.parametrize("strategy,stored_for_later_loops", [
    ("per_loop", [10, 20, 30]),  # loop r of a later token reads loop r
    ("last", [30, 30, 30]),
    ("mean", [20, 20, 20]),
    ("first", [10, 10, 10]),
])
def test_what_a_later_token_reads(strategy, stored_for_later_loops):
    cache = cache_for(strategy)
    prefill = run_step(cache, 2, R, lambda r: 10 * (r + 1))
    # inside prefill the prompt always sees its own current loop (never a shared slot)
    assert prefill == [[10, 10], [20, 20], [30, 30]]
    decode = run_step(cache, 1, R, lambda r: 100 + r)
    for r in range(R):
        # past positions: what the strategy kept; the new token: its own loop-r K/V
        assert decode[r] == [stored_for_later_loops[r]] * 2 + [100 + r]


@pytest.mark.parametrize("strategy,exposed", [
    ("per_loop", [10, 20, 20]),  # the deepest computed KV (loop 2) fills the slot of loop 3
    ("last", [20, 20, 20]),
    ("mean", [15, 15, 15]),
    ("first", [10, 10, 10]),
])
def test_a_token_that_stopped_early_exposes_its_deepest_kv(strategy, exposed):
    cache = cache_for(strategy)
    run_step(cache, 1, 2, lambda r: 10 * (r + 1))  # only 2 of 3 loops
    assert cache.depth[0, 0] == 2
    decode = run_step(cache, 1, R, lambda r: 100 + r)
    assert [seen[0] for seen in decode] == exposed


def test_memory_is_one_over_R_of_per_loop_for_the_core():
    cfg = tiny_config(num_loops=4)
    caches = {s: looplm.KVCache(cfg, batch_size=2, max_len=5, num_loops=4, strategy=s) for s in looplm.cache.STRATEGIES}
    per_loop = caches["per_loop"]
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    assert per_loop.core_bytes_per_token == per_slot * 4 * cfg.num_core_layers
    for s in ("last", "mean", "first"):
        assert caches[s].core_bytes_per_token * 4 == per_loop.core_bytes_per_token
        # prelude and coda keep one slot each in every strategy
        assert per_loop.bytes_per_token - caches[s].bytes_per_token == per_slot * 3 * cfg.num_core_layers
        assert caches[s].nbytes == caches[s].bytes_per_token * 2 * 5


def test_kv_bytes_count_the_stored_positions():
    model = tiny_model()
    res = looplm.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4, kv="last", stop_tokens=[])
    # each row holds its own prompt (3 and 2: no padding) + 3 fed-back tokens; the 4th is sampled, never fed
    assert res.kv_bytes == res.kv_bytes_per_token * ((3 + 3) + (2 + 3))


def test_with_one_loop_all_strategies_coincide():
    model = tiny_model(num_loops=1, exit_gate=True, loop_norm=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    results = {s: looplm.generate(model, prompts, max_new_tokens=6, kv=s, stop_tokens=[]) for s in looplm.cache.STRATEGIES}
    for s, res in results.items():
        assert res.new_tokens == results["per_loop"].new_tokens, s
    cfg = model.config
    sizes = {looplm.KVCache(cfg, batch_size=1, max_len=4, num_loops=1, strategy=s).bytes_per_token
             for s in looplm.cache.STRATEGIES}
    assert len(sizes) == 1


def test_shared_strategies_change_decoding_when_looped():
    """With R > 1 the strategies really read different KV: logits differ from per_loop after prefill."""
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    prefill, logits = {}, {}
    for s in looplm.cache.STRATEGIES:
        cache = looplm.KVCache(model.config, batch_size=1, max_len=9, num_loops=R, strategy=s)
        with torch.no_grad():
            prefill[s] = model(ids[:, :8], cache=cache).logits
            logits[s] = model(ids[:, 8:], cache=cache).logits
    for s in ("last", "mean", "first"):
        # prefill is identical for every strategy (every loop keeps its KV there) ...
        torch.testing.assert_close(prefill[s], prefill["per_loop"])
        # ... and the next token reads different KV
        assert not torch.allclose(logits[s], logits["per_loop"], atol=1e-4), s


def test_bad_strategy_and_overflow():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="'bogus'"):
        looplm.KVCache(cfg, batch_size=1, max_len=4, num_loops=2, strategy="bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        looplm.generate(tiny_model(), [[1, 2]], kv="bogus")
    cache = looplm.KVCache(cfg, batch_size=1, max_len=4, num_loops=2)
    with pytest.raises(ValueError, match="num_loops=3"):
        cache.begin(torch.ones(1, 2, dtype=torch.bool), num_loops=3)
    with pytest.raises(ValueError, match="do not fit"):
        cache.begin(torch.ones(1, 5, dtype=torch.bool), num_loops=2)

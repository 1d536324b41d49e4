"""Gemma-3 and Qwen3 as data in the config (issue 12): tiny random HF models ≡ looplm, sliding windows
in prefill and through a cache that keeps only the window, a looped block ≡ duplicated layers."""


import pytest
import torch
import transformers

import looplm
from conftest import tiny_model

WINDOW = 5
GEMMA_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
               "full_attention"]


def _perturb(ref: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():  # norms away from their init and larger weights, so every weight matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.2)
    return ref.eval()


def gemma_config(layer_types=GEMMA_TYPES) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=128, query_pre_attn_scalar=24, layer_types=list(layer_types),
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2)


def qwen3_config(num_hidden_layers=4) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                    tie_word_embeddings=False)


@pytest.fixture(scope="module", params=["gemma3", "qwen3"])
def pair(request, tmp_path_factory):
    """(HF model, its save dir) with random weights."""
    torch.manual_seed(0)
    if request.param == "gemma3":
        ref = transformers.Gemma3ForCausalLM(gemma_config())
    else:
        ref = transformers.Qwen3ForCausalLM(qwen3_config())
    ref = _perturb(ref)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, path


def test_config_is_data(pair):
    ref, path = pair
    cfg = looplm.load(path).config
    assert cfg.qk_norm
    if ref.config.model_type == "gemma3_text":
        assert (cfg.norm_style, cfg.rms_norm_offset, cfg.hidden_act) == ("sandwich", 1.0, "gelu_pytorch_tanh")
        assert cfg.embed_scale == pytest.approx(64**0.5) and cfg.query_pre_attn_scalar == 24
        assert cfg.layer_types == GEMMA_TYPES and cfg.sliding_window == WINDOW
        assert (cfg.rope_theta, cfg.rope_local_base_freq) == (1e6, 1e4)
    else:
        assert cfg.norm_style == "pre" and cfg.sliding_window is None and cfg.head_dim == 16


def test_logits_match_transformers_past_the_window(pair):
    ref, path = pair
    ours = looplm.load(path)
    ids = torch.randint(3, 97, (2, 23), generator=torch.Generator().manual_seed(1))  # 23 > window 5
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # a left-padded row ≡ its tokens alone
        padded = ours(ids, attention_mask=mask).logits[1, 4:]
        torch.testing.assert_close(padded, ref(ids[1:, 4:]).logits[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    ref, path = pair
    ours = looplm.load(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 3)]
    res = looplm.generate(ours, prompts, max_new_tokens=14, kv="per_loop", stop_tokens=[])  # 9 + 14 ≫ window
    for p, mine in zip(prompts, res.new_tokens):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert mine == theirs[0, len(p):].tolist()
    for kv in ("last", "mean", "first"):  # at one loop every strategy keeps the same K/V
        assert looplm.generate(ours, prompts, max_new_tokens=14, kv=kv, stop_tokens=[]).new_tokens == res.new_tokens


def test_a_looped_block_equals_the_duplicated_layers(pair):
    """core=(1, 4) looped twice ≡ the HF model whose layers 1..3 are physically repeated."""
    ref, path = pair
    looped = looplm.load(path, core=(1, 4), num_loops=2)
    n = ref.config.num_hidden_layers
    order = [0, 1, 2, 3, 1, 2, 3, *range(4, n)]
    d = ref.config.to_dict()
    d.update(num_hidden_layers=len(order), layer_types=[ref.config.layer_types[i] for i in order])
    dup = type(ref)(type(ref.config)(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})).eval()
    src = ref.state_dict()
    weights = {}
    for key in dup.state_dict():
        if ".layers." in key:
            head, rest = key.split(".layers.")
            i, tail = rest.split(".", 1)
            key_src = f"{head}.layers.{order[int(i)]}.{tail}"
        else:
            key_src = key
        weights[key] = src[key_src]
    dup.load_state_dict(weights)
    ids = torch.randint(3, 97, (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(looped(ids).logits, dup(ids).logits, atol=1e-5, rtol=1e-5)
    # the core's weights exist once
    assert looped.weight_bytes() == looplm.load(path).weight_bytes()


def test_the_cache_keeps_only_the_window(pair):
    ref, path = pair
    model = looplm.load(path, core=(1, 4), num_loops=3)
    cfg = model.config
    # KVCache (model.forward's cache): a 12-token prefill, then 9 tokens fed one at a time
    cache = looplm.KVCache(cfg, batch_size=1, max_len=21, num_loops=3, strategy="per_loop")
    with torch.no_grad():
        model(torch.full((1, 12), 5), cache=cache)
        for _ in range(9):
            model(torch.full((1, 1), 5), cache=cache)
    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    if not n_sliding:
        assert cache.num_local_slots == 0 and cache.k_local.numel() == 0
        return
    assert cache.k_local.shape[3] == WINDOW - 1  # a query sees itself and window − 1 earlier keys
    slot = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    full = sum((3 if cfg.is_core(i) else 1) for i in range(cfg.num_layers) if not cfg.is_sliding(i))
    local = sum((3 if cfg.is_core(i) else 1) for i in range(cfg.num_layers) if cfg.is_sliding(i))
    assert cache.kv_bytes == slot * (full * cache.length + local * (WINDOW - 1))


# ------------------------------------------------------------------ the ring against full storage


def _sliding_tiny(**overrides):
    return tiny_model(norm_style="sandwich", qk_norm=True, rms_norm_offset=1.0, embed_scale=32**0.5,
                      hidden_act="gelu_pytorch_tanh", sliding_window=3, rope_local_base_freq=100.0,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                      exit_gate=True, num_loops=4, **overrides)


@pytest.mark.parametrize("kv", looplm.cache.STRATEGIES)
def test_the_ring_equals_keeping_every_position(kv):
    """KVCache's sliding layers through the window-sized ring ≡ the same layers keeping every position (the
    window applied by the mask): a prefill longer than the window, then tokens fed one at a time."""
    model = _sliding_tiny()
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(7))
    logits, nbytes = {}, {}
    for ring in (True, False):
        cache = looplm.KVCache(model.config, batch_size=2, max_len=14, num_loops=4, strategy=kv, sliding_ring=ring)
        with torch.no_grad():
            outs = [model(ids[:, :8], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits
                                                               for t in range(8, 14)]
        logits[ring], nbytes[ring] = torch.cat(outs, 1), cache.kv_bytes
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    assert nbytes[True] < nbytes[False]


def test_sliding_generation_equals_cache_free_forwards():
    """generate (the engine's pool: full rows, the window by mask) ≡ greedy decoding that re-runs a cache-free
    forward over the whole sequence for every token (per_loop, static depth: the two compute the same)."""
    model = _sliding_tiny()
    prompts = [[5, 9, 2, 7, 1, 8, 3], [4, 4]]
    res = looplm.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    for prompt, new in zip(prompts, res.new_tokens):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert new == seq[len(prompt):]


def test_chunked_prefill_through_the_ring_equals_one_pass():
    """Chunks longer than the window, then single tokens, through the cache ≡ a cache-free forward."""
    model = _sliding_tiny()
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(5))
    R = 4
    with torch.no_grad():
        full = model(ids, num_loops=R).logits
        cache = looplm.KVCache(model.config, batch_size=2, max_len=14, num_loops=R)
        outs = [model(ids[:, a:b], num_loops=R, cache=cache).logits for a, b in ((0, 6), (6, 7), (7, 11), (11, 14))]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_sliding_configs_are_refused():
    with pytest.raises(ValueError, match="sliding_window"):
        looplm.LoopConfig(num_core_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types has 1 entries"):
        looplm.LoopConfig(num_core_layers=2, sliding_window=4, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="'local'"):
        looplm.LoopConfig(num_core_layers=1, sliding_window=4, layer_types=["local"])


def test_unsupported_hf_options_are_refused(tmp_path):
    from looplm.checkpoint import CheckpointError, config_from_hf

    d = gemma_config().to_dict()
    with pytest.raises(CheckpointError, match="attn_logit_softcapping=50"):
        config_from_hf({**d, "attn_logit_softcapping": 50.0})
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        config_from_hf({**qwen3_config().to_dict(), "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="multimodal Gemma-3"):
        config_from_hf({"model_type": "gemma3", "text_config": d})


# ------------------------------------------------------------------ every feature on the Gemma shape


@pytest.mark.parametrize("exit", [None, "conv:0.3", "kl:0.05", "entropy:3.5", "q:0.5"])
def test_eval_scores_a_gemma_like_model_as_an_independent_forward(exit):
    from test_eval_runner import TOK, loglik_by_hand, mc_task

    from looplm.evaluation import runner

    m = _sliding_tiny(vocab_size=257, max_position_embeddings=256)  # window 3 ≪ the ~25-byte prompts
    task = mc_task(4)
    for kv in looplm.cache.STRATEGIES if exit is None else ("per_loop", "last"):
        run = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-mc", loops=4, exit=exit, kv=kv),
                              progress=False)
        assert 1 <= run["mean_loops"] <= 4
        if exit is None and kv == "per_loop":  # shared KV scores continuations as decode steps would
            for item, row in zip(task.items, run["items"]):
                want = [loglik_by_hand(m, item.prompt, c) for c in item.choices]
                assert row["loglik"] == pytest.approx(want, abs=1e-4)


def test_retrofit_search_reuse_on_the_gemma_shape():
    """score_batch (packed items, a sliding window by position) ≡ looplm.load(core=(i, j)) + score per candidate."""
    import looplm.retrofit_search as rs
    from test_retrofit_search import TOK, naive_logliks, random_items

    model = tiny_model(vocab_size=257, num_prelude_layers=0, num_core_layers=6, num_coda_layers=0, num_loops=1,
                       max_position_embeddings=256, norm_style="sandwich", qk_norm=True, rms_norm_offset=1.0,
                       embed_scale=32**0.5, hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=12.0,
                       sliding_window=6, rope_local_base_freq=100.0, final_logit_softcapping=8.0,
                       layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3)
    items = rs.encode_items(TOK, random_items(5, seed=3))
    cands = [rs.Candidate(0, 2, 2), rs.Candidate(2, 4, 3), rs.Candidate(3, 6, 2)]
    got = rs.score_batch(model, rs.pack(items, width=80), cands)
    for key, cand in [(rs.BASE, None)] + [(c.key, c) for c in cands]:
        want = naive_logliks(model, items, cand)
        torch.testing.assert_close(torch.tensor([got[key][it.id] for it in items], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_a_gemma_like_looplm_dir_round_trips_and_loads_in_transformers(tmp_path):
    import looplm.hf  # noqa: F401  (registers the Auto classes)

    model = _sliding_tiny()
    looplm.save(model, tmp_path / "m")
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(looplm.load(tmp_path / "m")(ids).logits, want, atol=0, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-6, rtol=1e-6)

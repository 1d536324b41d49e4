"""Generation: sampling distributions, seeds per row, stop tokens, streaming, reported figures."""

import pytest
import torch

import looplm
from conftest import tiny_model


def test_greedy_equals_argmax_of_a_cache_free_forward():
    model = tiny_model()
    prompt = [5, 9, 2, 44]
    res = looplm.generate(model, [prompt], max_new_tokens=6, stop_tokens=[])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert res.new_tokens[0] == seq[len(prompt):]
    assert res.sequences[0].tolist() == seq


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(0)]
    draws = lambda **kw: {int(looplm.sample(logits, temperature=1.0, generators=gens, **kw)) for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}  # token 0 alone holds 0.5
    assert draws(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert int(looplm.sample(logits)) == 0  # temperature 0 = greedy


def test_sampling_matches_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gens = [torch.Generator().manual_seed(1)]
    n = 6000
    counts = torch.bincount(torch.cat([looplm.sample(logits, temperature=2.0, generators=gens) for _ in range(n)]),
                            minlength=4)
    expected = (logits / 2.0).softmax(-1)[0] * n
    assert ((counts - expected).abs() < 4 * expected.sqrt() + 5).all(), (counts, expected)


def test_seeded_sampling_is_per_row_and_reproducible():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=123, stop_tokens=[], kv="last")
    a = looplm.generate(model, prompts, **kw)
    b = looplm.generate(model, prompts, **kw)
    assert a.new_tokens == b.new_tokens
    for i, p in enumerate(prompts):  # a row samples the same tokens alone as in the batch
        assert looplm.generate(model, [p], **kw).new_tokens[0] == a.new_tokens[i]
    assert looplm.generate(model, prompts, **{**kw, "seed": 7}).new_tokens != a.new_tokens


def test_stop_tokens_end_rows_independently():
    model = tiny_model()
    prompts = [[1, 2, 3], [10, 11, 12, 13]]
    free = looplm.generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    stop = free.new_tokens[0][2]  # row 0's third token
    res = looplm.generate(model, prompts, max_new_tokens=8, stop_tokens=[stop])
    first0 = free.new_tokens[0].index(stop)
    assert res.new_tokens[0] == free.new_tokens[0][: first0 + 1]
    assert res.finish_reasons[0] == "stop"
    assert (res.loops_per_token[0, first0 + 1 :] == 0).all()
    assert (res.loops_per_token[0, : first0 + 1] == model.config.num_loops).all()
    row1 = free.new_tokens[1]
    expected1 = row1[: row1.index(stop) + 1] if stop in row1 else row1
    assert res.new_tokens[1] == expected1


def test_streaming_yields_the_same_tokens_step_by_step():
    model = tiny_model()
    prompts = [[4, 8, 15], [16, 23, 42, 7]]
    gen = looplm.stream(model, prompts, max_new_tokens=5, num_loops=2, kv="mean", stop_tokens=[])
    steps = list(gen)
    assert [s.index for s in steps] == list(range(5))
    assert all(s.tokens.shape == (2,) and (s.loops == 2).all() for s in steps)
    res = looplm.generate(model, prompts, max_new_tokens=5, num_loops=2, kv="mean", stop_tokens=[])
    assert torch.stack([s.tokens for s in steps], 1).tolist() == res.new_tokens
    assert gen.result().new_tokens == res.new_tokens


def test_tensor_input_with_attention_mask_equals_list_input():
    model = tiny_model()
    prompts = [[1, 2, 3, 4], [5, 6]]
    ids, mask = looplm.engine.left_pad(prompts, pad_token_id=0)
    a = looplm.generate(model, ids, attention_mask=mask, max_new_tokens=4, stop_tokens=[])
    b = looplm.generate(model, prompts, max_new_tokens=4, stop_tokens=[])
    assert a.new_tokens == b.new_tokens and a.sequences.tolist() == b.sequences.tolist()
    assert a.prompt_tokens == 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(num_loops=0), "num_loops"),
    (dict(seed=[1, 2, 3]), "3 seeds for 2 prompts"),
])
def test_bad_generation_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        looplm.generate(tiny_model(), [[1, 2], [3]], **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts():
    with pytest.raises(ValueError, match="at least one token"):
        looplm.generate(tiny_model(), [[1, 2], []])
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        looplm.generate(tiny_model(), [[1, 2, 99]])


def test_scoring_through_the_cache_equals_one_forward():
    """Teacher-forced decoding (per_loop, static) gives the log-likelihood of a cache-free forward."""
    model = tiny_model()
    contexts, conts = [[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10]]
    fast = looplm.score(model, contexts, conts)
    gen = looplm.engine.Generation(model, contexts, force=conts, stop_tokens=[]).result()
    for i, k in enumerate((3, 1)):
        torch.testing.assert_close(torch.tensor(fast.logprobs[i]), gen.logprobs[i, :k], atol=1e-5, rtol=1e-5)
        assert gen.new_tokens[i] == conts[i]
    with torch.no_grad():  # by hand for row 0
        logp = torch.log_softmax(model(torch.tensor([contexts[0] + conts[0]])).logits[0], -1)
    expected = [logp[3 + j, conts[0][j]].item() for j in range(3)]
    assert fast.logprobs[0] == pytest.approx(expected, abs=1e-5)
    shared = looplm.score(model, contexts, conts, kv="last")  # the strategy acts on the continuation
    assert shared.logprobs[1] == pytest.approx(fast.logprobs[1], abs=1e-5)  # 1 token: prefill only
    assert shared.logprobs[0][1:] != pytest.approx(fast.logprobs[0][1:], abs=1e-5)


def test_partly_forced_rows_answer_in_turns():
    """force with None entries: the model answers there (greedy), the rest is given; it equals a cache-free
    greedy forward that appends the given tokens."""
    model = tiny_model()
    prompts = [[5, 9, 2, 44], [7, 3]]
    force = [[None, 12, None, None, 30, None], [None, None, 17]]
    res = looplm.generate(model, prompts, force=force, stop_tokens=[])
    for prompt, f, got in zip(prompts, force, res.new_tokens):
        seq = list(prompt)
        with torch.no_grad():
            for t in f:
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()) if t is None else t)
        assert got == seq[len(prompt):]
        assert [g for g, t in zip(got, f) if t is not None] == [t for t in f if t is not None]
    assert res.loops_per_token.shape == (2, 6) and res.loops_per_token[1, 3:].eq(0).all()
    with pytest.raises(ValueError, match=r"forced tokens of row 0.*\[99\]"):
        looplm.generate(model, [[1, 2]], force=[[None, 99]])


def test_bad_ids_and_masks_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"continuation 0.*\[61\]"):
        looplm.score(model, [[1, 2]], [[61]])
    with pytest.raises(ValueError, match=r"context 0.*\[99\]"):
        looplm.score(model, [[1, 99]], [[3]], kv="last")
    with pytest.raises(ValueError, match=r"\[-1\]"):
        looplm.score(model, [[1, 2]], [[-1]], kv="last")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="left-padded"):
        looplm.generate(model, ids, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        looplm.generate(model, ids, attention_mask=torch.tensor([[0, 0, 0]]), max_new_tokens=2)
    # past the window a sliding model runs (issue 12: real sliding-window attention), a bad window is refused
    res = looplm.generate(tiny_model(sliding_window=8), [[1, 2, 3, 4, 5]], max_new_tokens=10, stop_tokens=[])
    assert len(res.new_tokens[0]) == 10
    with pytest.raises(ValueError, match="sliding_window must be ≥ 1 or None, got 0"):
        tiny_model(sliding_window=0)


def test_reported_policy_keeps_its_bounds():
    model = tiny_model()
    res = looplm.generate(model, [[1, 2]], exit="kl:0.05|conv:0.2,min=2,max=3", max_new_tokens=2, stop_tokens=[])
    assert res.exit_policy == "kl:0.05|conv:0.2,min=2,max=3"
    assert looplm.parse_exit(res.exit_policy).spec() == res.exit_policy

"""The engine (looplm.batching): continuous batching at loop granularity, every request exact as if alone."""

import pytest
import torch

import looplm
from conftest import tiny_model
from looplm.batching import Engine
from test_model import SHAPES

ENGINE_SHAPES = {
    "gate+coda+loopnorm": dict(SHAPES["gate+coda+loopnorm"], num_loops=4),
    "ouro-like": dict(SHAPES["ouro-like"], num_loops=4),
    "inject-concat+gate": dict(SHAPES["inject-concat+gate"], num_loops=4),
    "gemma-like": dict(SHAPES["gemma-like"], num_loops=4),  # window 4: prompts and decodes run past it
}
# mixed budgets: static 1–4, each adaptive policy, combinations, bounds (thresholds give mixed loops here)
BUDGETS = [dict(num_loops=1), dict(num_loops=2), dict(num_loops=3), dict(), dict(exit="q:0.5"),
           dict(exit="conv:0.6"), dict(exit="kl:0.2"), dict(exit="q:0.5|conv:0.6,min=2"),
           dict(exit="kl:0.1&conv:0.7"), dict(exit="entropy:3.9,min=2", num_loops=3), dict(exit="q:0.4", num_loops=3)]


def requests(n=22, seed=0):
    """n requests: mixed budgets, prompt lengths 1–20, max_new_tokens 1–10, some sampled with their own seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 61, (int(torch.randint(1, 21, (), generator=g)),), generator=g).tolist()
        kw = dict(BUDGETS[i % len(BUDGETS)], max_new_tokens=int(torch.randint(1, 11, (), generator=g)))
        if i % 3 == 1:
            kw.update(temperature=0.8, top_k=30 if i % 2 else None, top_p=0.9 if i % 4 == 1 else None, seed=100 + i)
        out.append((prompt, kw))
    return out


def alone(model, prompt, kv, kw):
    res = looplm.generate(model, [prompt], kv=kv, stop_tokens=[], **kw)
    return res.new_tokens[0], res.loops_per_token[0, : len(res.new_tokens[0])].tolist(), res.logprobs[0].tolist()


def run(engine, reqs, *, join_every=1, on_step=None):
    """Add request i at step i * join_every (staggered joins); step until done. Returns id → (tokens, loops, logprobs)."""
    got, ids, step = {}, [], 0
    pending = list(reqs)
    while pending or engine.has_unfinished_requests():
        while pending and len(ids) * join_every <= step:
            prompt, kw = pending.pop(0)
            ids.append(engine.add_request(prompt, stop_tokens=[], **kw))
            got[ids[-1]] = ([], [], [])
        for out in engine.step():
            got[out.request_id][0].extend(out.new_tokens)
            got[out.request_id][1].extend(out.loops)
            got[out.request_id][2].extend(out.logprobs)
        if on_step:
            on_step(step, ids)
        step += 1
    return [got[i] for i in ids]


# every strategy on the shape with prelude, coda and gate; per_loop and last on every other shape
CASES = [("gate+coda+loopnorm", kv) for kv in ("per_loop", "last", "mean", "first")] + \
    [(shape, kv) for shape in ENGINE_SHAPES if shape != "gate+coda+loopnorm" for kv in ("per_loop", "last")]


@pytest.mark.parametrize("shape, kv", CASES)
def test_every_request_equals_itself_alone(shape, kv):
    """22 requests with mixed budgets, lengths and seeds join at staggered steps, 6 rows at most, prompts
    chunked 8 tokens a step: each one's tokens, loops and logprobs are those of `generate` on it alone."""
    model = tiny_model(**ENGINE_SHAPES[shape])
    reqs = requests()
    engine = Engine(model, kv=kv, max_loops=4, max_batch_size=6, max_tokens=150, max_step_tokens=8)
    results = run(engine, reqs, join_every=2)
    loops_seen = set()
    for (prompt, kw), (tokens, loops, logprobs) in zip(reqs, results):
        ref_tokens, ref_loops, ref_logprobs = alone(model, prompt, kv, kw)
        assert tokens == ref_tokens, (prompt, kw)
        assert loops == ref_loops, (prompt, kw)
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-5, rtol=1e-5)
        if "exit" in kw:
            loops_seen.update(loops)
    assert len(loops_seen) >= 3, loops_seen  # the exits really differ per token
    assert engine.stats()["running"] == 0 and engine.pool.free_rows == 6 and engine.reserved == 0


def test_the_batch_mixes_loops_within_a_step():
    """Loop granularity: in some step, tokens at different loops and a prompt chunk run in one core pass."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    engine = Engine(model, kv="last", max_loops=4, max_step_tokens=8)
    mixes = []
    orig = engine._schedule

    def spy():
        items = orig()
        mixes.append(({it.loop for it in items if not it.prefill}, any(it.prefill for it in items)))
        return items

    engine._schedule = spy
    run(engine, requests(10), join_every=3)
    assert any(len(loops) >= 2 and prefill for loops, prefill in mixes)


def test_compute_accounting():
    """(token, core layer) evaluations = C × Σ loops: decode tokens after the first, prompt positions × R."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    C = model.config.num_core_layers
    reqs = requests(12, seed=3)
    engine = Engine(model, kv="last", max_loops=4, max_step_tokens=16)
    results = run(engine, reqs)
    stats = engine.stats()
    assert stats["decode_core_layer_evals"] == C * sum(sum(loops[1:]) for _, loops, _ in results)
    Rs = [model.resolve_budget(kw.get("num_loops"), kw.get("exit"))[0] for _, kw in reqs]
    assert stats["prefill_core_layer_evals"] == C * sum(R * len(p) for R, (p, _) in zip(Rs, reqs))


def test_abort_frees_the_row_and_the_rest_is_unaffected():
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    reqs = requests(5, seed=4)
    reqs = [(p, dict(kw, max_new_tokens=10)) for p, kw in reqs]
    engine = Engine(model, kv="per_loop", max_loops=4, max_batch_size=4, max_step_tokens=64)
    victim = {}

    def abort_mid(step, ids):
        if step == 6:
            victim["id"] = ids[1]
            engine.abort(ids[1])
            assert engine.stats()["running"] == 3 and engine.pool.free_rows == 1  # the 5th request waits no more
    results = run(engine, reqs, join_every=0, on_step=abort_mid)
    assert len(results[1][0]) < 10  # cut short
    for i in (0, 2, 3, 4):
        prompt, kw = reqs[i]
        assert results[i][:2] == alone(model, prompt, "per_loop", kw)[:2]
    with pytest.raises(KeyError, match="unknown request id"):
        engine.abort(victim["id"])
    assert engine.pool.free_rows == 4


def test_admission_waits_until_the_kv_fits():
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    engine = Engine(model, kv="last", max_loops=4, max_tokens=30)
    a = engine.add_request(list(range(1, 13)), max_new_tokens=8, stop_tokens=[])  # reserves 20
    b = engine.add_request(list(range(5, 10)), max_new_tokens=6, stop_tokens=[])  # 11 more: 31 > 30
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    got = {a: [], b: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_tokens
            if out.request_id == a and out.finished:
                assert engine.stats()["waiting"] == 1  # b enters at the next step
    assert got[b] == alone(model, list(range(5, 10)), "last", dict(max_new_tokens=6))[0]
    with pytest.raises(ValueError, match="can never fit.*max_tokens=30"):
        engine.add_request(list(range(1, 25)), max_new_tokens=8)


def test_truncate_rolls_a_request_back():
    """Roll back to 3 of 8 generated tokens, continue: the greedy continuation is recomputed identically."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    prompt = [3, 14, 15, 9, 26]
    for kv in ("per_loop", "last", "mean", "first"):
        ref = alone(model, prompt, kv, dict(max_new_tokens=12, exit="q:0.5"))
        engine = Engine(model, kv=kv, max_loops=4)
        rid = engine.add_request(prompt, max_new_tokens=12, exit="q:0.5", stop_tokens=[])
        tokens = []
        while len(tokens) < 8:
            for out in engine.step():
                tokens += out.new_tokens
        engine.truncate(rid, 3)
        assert engine.pool.lengths[engine.requests[rid].row] == len(prompt) + 2
        tokens = tokens[:3]
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.new_tokens
        assert tokens == ref[0], kv


@pytest.mark.parametrize("bad, match", [
    (dict(num_loops=5), r"num_loops must be an integer in \[1, max_loops=4\], got 5"),
    (dict(num_loops=0), r"got 0"),
    (dict(exit="q:0.5|"), r"unknown policy ''"),
    (dict(exit="bogus:1"), r"unknown policy 'bogus'"),
    (dict(exit="q:0.6"), r"needs an exit gate"),
    (dict(prompt=[]), r"empty prompt"),
    (dict(prompt=[1, 61]), r"token ids must be in \[0, 61\); got \[61\]"),
    (dict(prompt=list(range(1, 60)), max_new_tokens=10), r"max_position_embeddings=64"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer ≥ 1, got 0"),
    (dict(temperature=-1.0), r"temperature must be ≥ 0, got -1.0"),
    (dict(force=[5, None, 61]), r"force must be .* got \[61\]"),
    (dict(force=[]), r"force must be a non-empty list"),
])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(bad, match):
    model = tiny_model()  # no exit gate
    engine = Engine(model, kv="last", max_loops=4)
    engine.add_request([1, 2, 3], max_new_tokens=4, stop_tokens=[])
    tokens = [t for out in engine.step() for t in out.new_tokens]
    kw = dict(bad)
    prompt = kw.pop("prompt", [1, 2, 3])
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, **kw)
    with pytest.raises(KeyError, match="unknown request id 'nope'"):
        engine.abort("nope")
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_tokens
    assert tokens == alone(model, [1, 2, 3], "last", dict(max_new_tokens=4))[0]  # the good request is unharmed


def test_default_loops_above_max_loops_is_refused():
    model = tiny_model(num_loops=3)
    with pytest.raises(ValueError, match="default num_loops runs 3 loops; this engine allows max_loops=2"):
        Engine(model, max_loops=2).add_request([1, 2])
    with pytest.raises(ValueError, match="max_batch_size must be an integer ≥ 1, got 0"):
        Engine(model, max_batch_size=0)


def test_kv_bytes_are_accounted_per_request():
    """Each output says the KV its request holds: positions stored × bytes per position (the last token is
    not fed back, so prompt + generated − 1 positions); a prompt's per-loop scratch counts while it prefills."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    for kv in ("per_loop", "last"):
        engine = Engine(model, kv=kv, max_loops=4, max_step_tokens=4)
        prompt = list(range(1, 11))
        rid = engine.add_request(prompt, max_new_tokens=5, stop_tokens=[])
        per_token = engine.pool.bytes_per_token
        cfg = model.config
        scratch = 0 if kv == "per_loop" else 2 * cfg.num_core_layers * cfg.num_loops * cfg.num_key_value_heads * 10 * cfg.head_dim * 4
        engine.step()
        assert engine.request_kv_bytes(rid) == scratch  # the first chunk has not run its loops yet
        n = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n += 1
                assert out.kv_bytes == (len(prompt) + n - 1) * per_token
        slots = cfg.num_layers - cfg.num_core_layers + cfg.num_core_layers * (4 if kv == "per_loop" else 1)
        assert per_token == 2 * slots * cfg.num_key_value_heads * cfg.head_dim * 4


def test_top_logprobs_are_the_likeliest_under_the_model():
    """top_logprobs=k: per new token the k likeliest (id, log p), likeliest first; the greedy token is the first.
    Under per_loop the engine's logits are a full forward's over prompt + generated tokens."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    engine = Engine(model, kv="per_loop", max_loops=4, max_batch_size=2, max_tokens=100)
    prompt = list(range(3, 15))
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.add_request(prompt, top_logprobs=-1)
    engine.add_request(prompt, max_new_tokens=4, num_loops=3, stop_tokens=[], top_logprobs=5)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    tokens = [o.new_tokens[0] for o in outs]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + tokens]), num_loops=3).logits[0].log_softmax(-1)
    for i, o in enumerate(outs):
        (top,) = o.top_logprobs
        vals, ids = logp[len(prompt) - 1 + i].topk(5)
        assert [t for t, _ in top] == ids.tolist() and top[0][0] == o.new_tokens[0]
        torch.testing.assert_close(torch.tensor([v for _, v in top]), vals, atol=1e-5, rtol=1e-5)


def test_forced_tokens_are_emitted_and_the_rest_sampled():
    """force: given tokens are emitted as they are (their log p under the model reported), None leaves a position
    to the model, the request ends after the last entry whatever the stop tokens; `greedy` says argmax."""
    model = tiny_model()
    engine = Engine(model, kv="per_loop", max_loops=4)  # per_loop: a decoded token sees what a prompt token sees
    free = engine.add_request([1, 2, 3], max_new_tokens=4, stop_tokens=[])
    forced = engine.add_request([1, 2, 3], force=[7, None, 9, 9], stop_tokens=[9])
    outs: dict[str, list] = {free: [], forced: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    toks = {rid: [t for o in os_ for t in o.new_tokens] for rid, os_ in outs.items()}
    assert toks[forced][0] == 7 and toks[forced][2:] == [9, 9] and outs[forced][-1].finish_reason == "length"
    assert all(o.greedy == [True] for o in outs[free])  # greedy decoding: every token is the argmax
    # position 1 was left to the model: greedy after the forced 7, i.e. what a request whose prompt ends in 7 picks
    after7 = alone(model, [1, 2, 3, 7], "per_loop", dict(max_new_tokens=1))[0]
    assert toks[forced][1] == after7[0] and outs[forced][1].greedy == [True]

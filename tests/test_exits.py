"""Exit policies: parsing, hand-built decisions, the Ouro Q-exit rule, real per-token exits in a batch."""

import math

import pytest
import torch

import looplm
from conftest import tiny_model
from looplm.exits import LoopStats, parse_exit

GATED = dict(num_prelude_layers=1, num_coda_layers=1, exit_gate=True, loop_norm=True, norm_style="sandwich",
             num_loops=4)


def gated_model(seed=0, **kw):
    model = tiny_model(seed, **{**GATED, **kw})
    with torch.no_grad():  # a gate whose λ spreads over (0, 1) across tokens
        model.early_exit_gate.weight.normal_(0, 1.0)
        model.early_exit_gate.bias.fill_(-0.5)
    return model


def stats(loop, **tensors):
    n = len(next(iter(tensors.values())))
    return LoopStats(loop=loop, size=n, **{k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec,text", [
    ("static:3", "static:3"), ("q:0.6", "q:0.6"), ("conv:0.02", "conv:0.02"), ("kl:1e-3", "kl:0.001"),
    ("entropy:1.0", "entropy:1"), ("q:0.6|conv:0.02", "q:0.6|conv:0.02"), ("q:0.6&kl:0.01,min=2", "q:0.6&kl:0.01"),
])
def test_parse(spec, text):
    assert str(parse_exit(spec)) == text


def test_parse_bounds_and_needs():
    p = parse_exit("q:0.6|conv:0.02,min=2,max=5")
    assert (p.min_loops, p.max_loops) == (2, 5)
    assert p.needs == {"gate", "hidden"}
    assert parse_exit("conv:0.1").needs == {"hidden"}  # no logits asked: none computed per loop


@pytest.mark.parametrize("spec,match", [
    ("q:abc", "'abc' is not a valid float"), ("q:1.5", r"q:1.5.*\[0, 1\]"), ("foo:1", "unknown policy 'foo'"),
    ("q:0.5,min=4,max=2", "min=4 > max=2"), ("q", "'q' needs a value"), ("static:0", "static:0"),
    ("conv:-1", "conv:-1"), ("q:0.5|conv:0.1&kl:1", "ambiguous"), ("q:0.5,min=x", "'min=x' needs an integer"),
    ("", "non-empty"), ("q:nan", "finite"),
])
def test_parse_errors_name_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_exit(spec)


def test_q_exit_needs_a_gate():
    with pytest.raises(ValueError, match="needs an exit gate"):
        tiny_model()(torch.zeros(1, 3, dtype=torch.long), exit="q:0.5")
    with pytest.raises(ValueError, match="needs an exit gate"):
        looplm.generate(tiny_model(), [[1, 2]], exit="q:0.5", max_new_tokens=2)


# --------------------------------------------------------------------------- hand-built decisions


def test_each_policy_by_hand():
    s = stats(2, cdf=[0.2, 0.6, 0.9], rel_change=[0.5, 0.01, 0.03], kl=[1e-4, 0.1, 1e-2], entropy=[0.5, 2.0, 1.1])
    R = 4
    assert parse_exit("q:0.6").exits(s, R).tolist() == [False, True, True]
    assert parse_exit("conv:0.02").exits(s, R).tolist() == [False, True, False]
    assert parse_exit("kl:1e-3").exits(s, R).tolist() == [True, False, False]
    assert parse_exit("entropy:1.0").exits(s, R).tolist() == [True, False, False]
    assert parse_exit("q:0.7|conv:0.02").exits(s, R).tolist() == [False, True, True]
    assert parse_exit("q:0.5&conv:0.02").exits(s, R).tolist() == [False, True, False]
    assert parse_exit("q:0.6,min=3").exits(s, R).tolist() == [False, False, False]  # loop 2 < min
    assert parse_exit("q:0.99,max=2").exits(s, R).tolist() == [True, True, True]  # max reached
    assert parse_exit("q:0.99").exits(stats(4, cdf=[0.1, 0.2, 0.3]), R).tolist() == [True] * 3  # last loop
    assert parse_exit("static:3").exits(s, R).tolist() == [False] * 3
    assert parse_exit("static:3").exits(stats(3, cdf=[0.0, 0.0, 0.0]), R).tolist() == [True] * 3


def test_tracker_statistics_by_hand():
    policy = parse_exit("q:0.5&conv:1.0&kl:10")
    tracker = looplm.exits.LoopTracker(policy, 2, "cpu", start_hidden=torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    lam1, lam2 = torch.tensor([0.5, 0.1]), torch.tensor([0.5, 0.2])
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)
    s1 = tracker.step(1, hidden=torch.tensor([[1.0, 1.0], [0.0, 2.0]]), lam=lam1, logits=logits)
    torch.testing.assert_close(s1.cdf, torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(s1.rel_change, torch.tensor([1 / math.sqrt(2), 0.0]))
    torch.testing.assert_close(s1.entropy, torch.tensor([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))
    assert torch.isinf(s1.kl).all()
    s2 = tracker.step(2, hidden=torch.tensor([[1.0, 1.0], [0.0, 1.0]]), lam=lam2, logits=logits.flip(0))
    torch.testing.assert_close(s2.cdf, torch.tensor([0.5 + 0.5 * 0.5, 0.1 + 0.2 * 0.9]))
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_2 ‖ p_1), row 0
    torch.testing.assert_close(s2.kl[0], torch.tensor(kl0))


# --------------------------------------------------------------------------- full forward


def ouro_reference_q_exit(pdf, loop_logits, q):
    """Ouro's rule: the first loop whose CDF (cumsum of the pdf) reaches q, else the last loop."""
    cdf = pdf.cumsum(-1)  # (B, S, R)
    hit = cdf >= q
    idx = hit.float().argmax(-1)
    idx[~hit.any(-1)] = pdf.shape[-1] - 1
    picked = loop_logits.permute(1, 2, 0, 3).gather(2, idx[..., None, None].expand(-1, -1, 1, loop_logits.shape[-1]))
    return picked[:, :, 0], idx + 1


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_full_forward_q_exit_equals_the_reference_rule(q):
    model = gated_model(num_coda_layers=0, num_prelude_layers=0)  # Ouro's shape: the loop norm feeds the head
    ids = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids, return_loops=True)
        out = model(ids, exit=f"q:{q}")
    logits, loop = ouro_reference_q_exit(ref.exit_pdf, ref.loop_logits, q)
    assert out.exit_loop.tolist() == loop.tolist()
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    assert len(set(loop.flatten().tolist())) > 1  # the test exercises different exits


def test_q_one_is_static_R_and_tiny_q_is_one_loop():
    model = gated_model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids, return_loops=True)
        one = model(ids, exit="q:1.0")
        lam1 = full.exit_lambda[..., 0].min().item()
        low = model(ids, exit=f"q:{lam1 * 0.5}")
    assert (one.exit_loop == 4).all()
    torch.testing.assert_close(one.logits, full.logits)
    assert (low.exit_loop == 1).all()
    torch.testing.assert_close(low.logits, full.loop_logits[0], atol=1e-5, rtol=1e-5)
    for kv in looplm.cache.STRATEGIES:
        a = looplm.generate(model, [[3, 4, 5]], exit="q:1.0", kv=kv, max_new_tokens=5, stop_tokens=[])
        b = looplm.generate(model, [[3, 4, 5]], num_loops=4, kv=kv, max_new_tokens=5, stop_tokens=[])
        assert a.new_tokens == b.new_tokens and (a.loops_per_token == 4).all()


# --------------------------------------------------------------------------- decoding with real exits


@pytest.mark.parametrize("kv", looplm.cache.STRATEGIES)
@pytest.mark.parametrize("policy", ["q:0.5", "conv:0.3|kl:0.05,min=2", "entropy:3.5"])
def test_batched_exits_equal_each_prompt_alone(kv, policy):
    model = gated_model()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (6, 2, 4, 5)]
    kw = dict(exit=policy, kv=kv, max_new_tokens=7, temperature=0.9, seed=11, stop_tokens=[])
    batch = looplm.generate(model, prompts, **kw)
    for i, p in enumerate(prompts):
        alone = looplm.generate(model, [p], **kw)
        assert batch.new_tokens[i] == alone.new_tokens[0], f"row {i}"
        assert batch.loops_per_token[i].tolist() == alone.loops_per_token[0].tolist(), f"row {i}"
    assert len(set(batch.loops_per_token.flatten().tolist())) > 1  # exits really differ across tokens


@pytest.mark.parametrize("policy", ["q:0.4", "conv:0.5"])
def test_compute_done_equals_the_sum_of_exits(policy):
    model = gated_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    res = looplm.generate(model, prompts, exit=policy, max_new_tokens=8, stop_tokens=[])
    decode_loops = int(res.loops_per_token[:, 1:].sum())  # token 0 comes from prefill
    assert res.decode_core_layer_evals == decode_loops * model.config.num_core_layers
    static = looplm.generate(model, prompts, num_loops=4, max_new_tokens=8, stop_tokens=[])
    assert res.decode_core_layer_evals < static.decode_core_layer_evals == 3 * 7 * 4 * model.config.num_core_layers


def test_stopped_tokens_expose_their_deepest_kv_in_decode():
    """Under per_loop, the slots of loops a decoded token skipped hold its deepest computed K/V (the engine's
    pool keeps KVCache's commit rule; generate decodes through it)."""
    model = gated_model()
    engine = looplm.Engine(model, kv="per_loop", max_batch_size=1)
    rid = engine.add_request([1, 2, 3, 4], exit="q:0.5", max_new_tokens=8, stop_tokens=[])
    loops: list[int] = []
    while len(loops) < 7:  # stop before the last token: a finished request's row is freed
        for out in engine.step():
            loops += out.loops
    pool, P, row = engine.pool, model.config.num_prelude_layers, engine.requests[rid].row
    # new token i was produced by feeding token i-1 at position 4 + i - 1, which ran loops[i] loops
    depth = loops[1 : 1 + pool.lengths[row] - 4]
    assert len(depth) == 6 and min(depth) < 4
    for t, e in enumerate(depth, start=4):
        for r in range(e, 4):  # every deeper slot holds the loop-e K/V
            assert torch.equal(pool.k.data[pool.slot(P, r), row, :, t], pool.k.data[pool.slot(P, e - 1), row, :, t])

"""The loop driver (issue 13, point 5): one place runs the core R times, against a loop written out by hand."""

import dataclasses

import pytest
import torch

import looplm
from conftest import tiny_model
from looplm.exits import parse_exit
from looplm.loops import LoopRun
from looplm.model import _Context

SHAPES = {
    "prelude-core-coda": dict(),
    "ouro-like": dict(num_prelude_layers=0, num_coda_layers=0, norm_style="sandwich", loop_norm=True, exit_gate=True),
    "inject-concat+gate": dict(injection="concat", exit_gate=True),
    "gemma-like": dict(norm_style="sandwich", qk_norm=True, rms_norm_offset=1.0, embed_scale=32**0.5, sliding_window=4,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                       rope_local_base_freq=100.0, exit_gate=True),
}


def by_hand(model, ids, R):
    """Each loop's hidden state, λ and logits: injection, the core layers one by one, the loop norm, the readout."""
    cfg = model.config
    ctx = model.context(ids, None, None, R)
    x = e = model.embed(ids, ctx)
    hidden, lams, logits = [], [], []
    for r in range(R):
        if r > 0 and cfg.injection == "add":
            x = x + e
        elif r > 0 and cfg.injection == "concat":
            x = model.injection(torch.cat([x, e], -1))
        for j in range(cfg.num_core_layers):
            x = model.layers[cfg.num_prelude_layers + j](x, ctx, cfg.num_prelude_layers + j, r)
        if cfg.loop_norm:
            x = model.norm(x)
        hidden.append(x)
        lams.append(None if model.early_exit_gate is None else torch.sigmoid(model.early_exit_gate(x)[..., 0].float()))
        logits.append(model.readout(x, ctx))
    return hidden, lams, logits


@pytest.mark.parametrize("name", list(SHAPES))
@torch.no_grad()
def test_the_driver_is_the_loop_by_hand_and_forward_uses_it(name):
    model = tiny_model(**SHAPES[name])
    R = 3
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    hidden, lams, logits = by_hand(model, ids, R)
    ctx = model.context(ids, None, None, R)
    run = LoopRun(model, model.embed(ids, ctx), ctx, R, logits=slice(None))
    loops = list(run)
    assert [loop.loop for loop in loops] == [1, 2, 3]
    for r, loop in enumerate(loops):
        torch.testing.assert_close(loop.hidden, hidden[r])
        torch.testing.assert_close(loop.logits, logits[r])
        if lams[r] is not None:
            torch.testing.assert_close(loop.lam, lams[r])
        assert loop.exits is None and loop.stats is None and loop.rows.tolist() == [0, 1]
    assert run.exit_loop.eq(R).all() and run.exit_hidden is loops[-1].hidden
    out = model(ids, num_loops=R, return_loops=True)
    torch.testing.assert_close(out.loop_logits, torch.stack(logits))
    torch.testing.assert_close(out.loop_hidden, torch.stack(hidden))


def q_exit_by_hand(lams, q):
    """(B, S) first loop whose exit CDF reaches q (the last loop when none does)."""
    cdf = looplm.exit_distribution(torch.stack(lams, -1)).cumsum(-1)  # (B, S, R)
    fired = cdf >= q
    fired[..., -1] = True
    return fired.float().argmax(-1) + 1


@torch.no_grad()
def test_every_position_keeps_its_own_exit_without_drop():
    model = tiny_model(**SHAPES["ouro-like"])
    R, ids = 4, torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(4))
    hidden, lams, _ = by_hand(model, ids, R)
    expect = q_exit_by_hand(lams, 0.5)
    assert 1 < expect.float().mean() < R  # some exit early, some late
    ctx = model.context(ids, None, None, R)
    run = LoopRun(model, model.embed(ids, ctx), ctx, R, policy=parse_exit("q:0.5"))
    exits = [loop.exits.clone() for loop in run]
    assert torch.equal(run.exit_loop, expect)
    for r, new in enumerate(exits):  # each position exits once, at its own loop
        assert torch.equal(new, expect == r + 1)
    at = torch.stack(hidden).gather(0, (expect - 1)[None, :, :, None].expand(1, *hidden[0].shape))[0]
    torch.testing.assert_close(run.exit_hidden, at)
    assert run.core_layer_evals == R * ids.numel() * model.config.num_core_layers  # every position ran every loop
    out = model(ids, num_loops=R, exit="q:0.5")
    assert torch.equal(out.exit_loop, expect)


@torch.no_grad()
def test_drop_runs_each_row_to_its_exit_only_and_counts_what_ran():
    """Decoding: one position per row; a row leaves the batch at its exit. The run counts C × Σ loops."""
    model = tiny_model(**SHAPES["ouro-like"])
    R, ids = 4, torch.randint(0, 61, (8, 1), generator=torch.Generator().manual_seed(5))
    _, lams, _ = by_hand(model, ids, R)
    expect = q_exit_by_hand(lams, 0.5)[:, 0]  # (B,)
    assert len(set(expect.tolist())) > 1
    ctx = model.context(ids, None, None, R)
    run = LoopRun(model, model.embed(ids, ctx), ctx, R, policy=parse_exit("q:0.5"), drop=True)
    ran = [(loop.loop, loop.rows.tolist()) for loop in run]
    for loop, rows in ran:  # the rows at loop r are exactly those whose exit is ≥ r
        assert rows == [b for b in range(8) if expect[b] >= loop]
    assert ran[-1][0] == int(expect.max())  # no loop runs after the last row left
    assert torch.equal(run.exit_loop[:, 0], expect)
    assert run.core_layer_evals == model.config.num_core_layers * int(expect.sum())
    res = looplm.generate(model, ids.tolist(), max_new_tokens=1, num_loops=R, exit="q:0.5")
    assert res.loops_per_token[:, 0].tolist() == expect.tolist()  # prefill: the last position's own exit


def test_grad_from_truncates_backprop_and_the_gate_still_learns():
    model = tiny_model(**SHAPES["ouro-like"]).train()
    ids = torch.randint(0, 61, (2, 5))
    ctx = model.context(ids, None, None, 3)
    loops = list(LoopRun(model, model.embed(ids, ctx), ctx, 3, logits=slice(None), grad_from=2))
    assert [loop.hidden.requires_grad for loop in loops] == [False, False, True]
    assert [loop.logits.requires_grad for loop in loops] == [False, False, True]
    assert all(loop.lam.requires_grad for loop in loops)  # λ follows the caller's grad mode
    loops[0].lam.sum().backward()
    assert model.early_exit_gate.weight.grad is not None and model.layers[0].mlp.up_proj.weight.grad is None


@torch.no_grad()
def test_a_block_from_a_later_start_and_the_layer_hook():
    """The retrofit search loops layers [i, j) of a plain model from loop 1's output; analysis reads each layer."""
    model = tiny_model(num_prelude_layers=0, num_core_layers=4, num_coda_layers=0, num_loops=1)
    ids = torch.randint(0, 61, (1, 6))
    ctx = model.context(ids, None, None, 1)
    x = model.embed(ids, ctx)
    for i in range(4):
        x = model.layers[i](x, ctx, i, 0)
        if i == 2:
            after_block = x  # the output of loop 1 of block [1, 3)
    seen = []
    loops = list(LoopRun(model, after_block, ctx, 3, start=1, block=(1, 3),
                         on_layer=lambda r, layer, a, b: seen.append((r, layer))))
    assert [loop.loop for loop in loops] == [2, 3] and seen == [(1, 1), (1, 2), (2, 1), (2, 2)]
    x = after_block
    for r in (1, 2):
        for i in (1, 2):
            x = model.layers[i](x, ctx, i, r)
        torch.testing.assert_close(loops[r - 1].hidden, x)


def test_the_forward_context_holds_no_training_fields():
    names = {f.name for f in dataclasses.fields(_Context)}
    assert names == {"cos", "sin", "mask", "is_causal", "cache", "rows", "sliding", "attend"}

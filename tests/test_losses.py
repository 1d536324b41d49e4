"""Each objective against values computed by hand on tiny tensors."""

import math

import pytest
import torch

import looplm
from looplm import losses
from looplm.config import LoopConfig
from looplm.model import LoopedLM
from looplm.train.objective import LossConfig, LoopObjective


def test_per_loop_ce_by_hand():
    # R=2, B=1, S=2, V=3; the second position is ignored
    logits = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]], [[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    labels = torch.tensor([[0, -100]])
    ce = losses.per_loop_ce(logits, labels)
    assert ce.shape == (2, 1, 2)
    assert ce[0, 0, 0].item() == pytest.approx(math.log(3))
    assert ce[1, 0, 0].item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)))
    assert ce[:, 0, 1].tolist() == [0.0, 0.0]


def test_per_loop_ce_rejects_wrong_labels():
    with pytest.raises(ValueError, match="labels shape"):
        losses.per_loop_ce(torch.zeros(2, 1, 3, 5), torch.zeros(1, 4, dtype=torch.long))


def test_stage1_by_hand():
    # one token, R=2, λ_1 = 0.25 → p = (0.25, 0.75); CE = (2.0, 1.0)
    ce = torch.tensor([[[2.0]], [[1.0]]])  # (R, B, S)
    lam = torch.tensor([[[0.25, 0.9]]])  # (B, S, R); λ_R does not enter p
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = losses.stage1_loss(ce, lam, mask, beta=0.1)
    H = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 1.0 - 0.1 * H, rel=1e-6)
    assert stats["exit_pdf"].tolist() == pytest.approx([0.25, 0.75])
    assert stats["exit_entropy"].item() == pytest.approx(H, rel=1e-6)


def test_stage1_masks_positions():
    ce = torch.tensor([[[2.0, 100.0]], [[1.0, 100.0]]])
    lam = torch.full((1, 2, 2), 0.5)
    with_pad, _ = losses.stage1_loss(ce, lam, torch.tensor([[True, False]]), beta=0.0)
    assert with_pad.item() == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)


def test_exit_pdf_sums_to_one():
    lam = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))
    pdf = losses.exit_distribution(lam)
    torch.testing.assert_close(pdf.sum(-1), torch.ones(3, 5))
    assert (pdf >= 0).all()


def test_stage2_targets_and_loss_by_hand():
    # CE per loop (R=3) for one token: 2.0 → 1.0 (I_2 = 1) → 1.0 (I_3 = 0)
    ce = torch.tensor([[[2.0]], [[1.0]], [[1.0]]])
    w = losses.stage2_targets(ce, k=50.0, gamma=0.005)
    assert w[:, 0, 0].tolist() == pytest.approx([1 / (1 + math.exp(-50 * 0.995)), 1 / (1 + math.exp(50 * 0.005))])
    lam = torch.tensor([[[0.2, 0.7, 0.5]]])  # λ_1 pairs with w_2, λ_2 with w_3; λ_3 unused
    loss, _ = losses.stage2_gate_loss(ce, lam, torch.ones(1, 1, dtype=torch.bool))

    def bce(p, t):
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (bce(0.8, w[0, 0, 0].item()) + bce(0.3, w[1, 0, 0].item())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_stage2_needs_two_loops():
    with pytest.raises(ValueError, match="at least 2 loops"):
        losses.stage2_gate_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_self_distillation_by_hand():
    t = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    s = torch.tensor([[[math.log(0.9), math.log(0.1)]]])
    kl = losses.self_distillation_loss(t, s, torch.ones(1, 1, dtype=torch.bool))
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)
    assert losses.self_distillation_loss(t, t, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-7)
    # the teacher gets no gradient
    tt = t.clone().requires_grad_(True)
    ss = s.clone().requires_grad_(True)
    losses.self_distillation_loss(tt, ss, torch.ones(1, 1, dtype=torch.bool)).backward()
    assert tt.grad is None and ss.grad is not None


def test_sample_num_loops_distributions():
    g = torch.Generator().manual_seed(0)
    draws = [losses.sample_num_loops(g, kind="poisson_lognormal", mean=4.0, sigma=0.5, high=32) for _ in range(4000)]
    assert min(draws) >= 1
    assert sum(draws) / len(draws) == pytest.approx(4.0, rel=0.08)
    u = [losses.sample_num_loops(g, kind="uniform", low=2, high=5) for _ in range(2000)]
    assert set(u) == {2, 3, 4, 5}
    a = losses.sample_num_loops(torch.Generator().manual_seed(7), mean=6.0)
    b = losses.sample_num_loops(torch.Generator().manual_seed(7), mean=6.0)
    assert a == b
    with pytest.raises(ValueError, match="uniform"):
        losses.sample_num_loops(g, kind="uniform", low=3, high=2)
    with pytest.raises(ValueError, match="unknown loop-count"):
        losses.sample_num_loops(g, kind="gamma")


def test_linear_schedule():
    assert losses.linear_schedule(0, 10, 0.1, 0.05) == pytest.approx(0.1)
    assert losses.linear_schedule(5, 10, 0.1, 0.05) == pytest.approx(0.075)
    assert losses.linear_schedule(50, 10, 0.1, 0.05) == pytest.approx(0.05)


# --------------------------------------------------------------------------- gradients through the objective


def _tiny(exit_gate=True):
    torch.manual_seed(0)
    cfg = LoopConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                     num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, num_loops=3, norm_style="sandwich",
                     loop_norm=True, exit_gate=exit_gate, max_position_embeddings=64)
    return LoopedLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[:, :3] = -100
    return ids, labels


def test_stage1_gradients_reach_gate_and_lm():
    model = _tiny()
    out = LoopObjective(model, LossConfig(stage="stage1"))(*_batch(), num_loops=3)
    out.loss.backward()
    assert model.early_exit_gate.weight.grad.abs().sum() > 0
    assert model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
    assert out.ce.shape == (3,)
    assert out.stats["exit_pdf"].sum().item() == pytest.approx(1.0, rel=1e-5)


def test_stage2_gradients_reach_only_the_gate():
    model = _tiny()
    out = LoopObjective(model, LossConfig(stage="stage2"))(*_batch(), num_loops=3)
    out.loss.backward()
    assert model.early_exit_gate.weight.grad.abs().sum() > 0
    others = [n for n, p in model.named_parameters() if not n.startswith("early_exit_gate") and p.grad is not None]
    assert others == []


def test_objective_matches_the_model_forward():
    """The loop-by-loop training forward gives the same per-loop CE as model(..., return_loops=True)."""
    model = _tiny()
    ids, labels = _batch()
    out = LoopObjective(model, LossConfig(stage="per_loop"))(ids, labels, num_loops=3)
    ref = model(ids, num_loops=3, return_loops=True)
    ce = losses.per_loop_ce(ref.loop_logits, labels)
    mask = labels != -100
    torch.testing.assert_close(out.ce, (ce * mask).sum((1, 2)) / mask.sum())


def test_hop_targets_train_loop_r_on_the_rth_intermediate():
    """loss.hop_targets: loop r's CE is taken against hop row min(r, H) − 1; the logged CE stays on the answer."""
    model = _tiny()
    ids, labels = _batch()
    g = torch.Generator().manual_seed(3)
    hops = torch.randint(0, 11, (2, *labels.shape), generator=g)  # H = 2 rows, loops 2 and 3 share row 1
    hops[:, labels == -100] = -100
    out = LoopObjective(model, LossConfig(stage="per_loop", hop_targets=True))(ids, labels, num_loops=3,
                                                                              hop_labels=hops)
    ref = model(ids, num_loops=3, return_loops=True).loop_logits
    mask = labels != -100
    want = sum((losses.per_loop_ce(ref[r : r + 1], hops[min(r, 1)])[0] * mask).sum() for r in range(3))
    torch.testing.assert_close(out.loss, want / (3 * mask.sum()))
    ce = losses.per_loop_ce(ref, labels)
    torch.testing.assert_close(out.ce, (ce * mask).sum((1, 2)) / mask.sum())
    with pytest.raises(ValueError, match="needs hop labels"):
        LoopObjective(model, LossConfig(stage="per_loop", hop_targets=True))(ids, labels, num_loops=3)
    with pytest.raises(ValueError, match="hop_targets applies to stage 'per_loop' only"):
        LossConfig(stage="stage1", hop_targets=True)


@pytest.mark.parametrize("kv", ["per_loop", "last"])
def test_decode_like_training_matches_generation_under_last_kv(kv):
    """With decode_from, the first answer position's training logits are those of the decode step that
    `looplm.score` takes under kv="last" (earlier positions' last-loop K/V, its own at each loop)."""
    model = _tiny()
    model.eval()
    g = torch.Generator().manual_seed(5)
    prompt, answer = torch.randint(0, 11, (6,), generator=g).tolist(), [4, 9]
    ids = torch.tensor([prompt + answer[:1]])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt)] = answer[1]  # only the first decoded position is scored
    decode_from = torch.tensor([len(prompt)]) if kv == "last" else None
    out = LoopObjective(model, LossConfig(stage="per_loop"))(ids, labels, num_loops=3, decode_from=decode_from)
    ref = looplm.score(model, [prompt], [answer], num_loops=3, kv=kv)
    assert out.ce[-1].item() == pytest.approx(-ref.logprobs[0][1], abs=1e-5)
    if kv == "last":  # and it differs from per-loop attention, so the test can tell them apart
        per_loop = looplm.score(model, [prompt], [answer], num_loops=3, kv="per_loop")
        assert per_loop.logprobs[0][1] != pytest.approx(ref.logprobs[0][1], abs=1e-4)


def test_truncated_backprop_leaves_first_loops_without_graph():
    model = _tiny()
    ids, labels = _batch()
    obj = LoopObjective(model, LossConfig(stage="per_loop"))
    out = obj(ids, labels, num_loops=3, no_grad_loops=2)
    out.loss.backward()
    # the prelude only feeds loop 1, which ran without gradient: it gets none
    assert model.layers[0].mlp.up_proj.weight.grad is None
    assert model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no_grad_loops"):
        obj(ids, labels, num_loops=3, no_grad_loops=3)


def test_distillation_term_adds_to_the_loss():
    model = _tiny()
    ids, labels = _batch()
    plain = LoopObjective(model, LossConfig(stage="stage1"))(ids, labels, num_loops=3, student_loop=1)
    distilled = LoopObjective(model, LossConfig(stage="stage1", distill_weight_start=2.0, distill_weight_end=2.0))(
        ids, labels, num_loops=3, student_loop=1)
    kl = distilled.stats["distill_kl"]
    assert kl > 0
    assert distilled.loss.item() == pytest.approx(plain.loss.item() + 2.0 * kl.item(), rel=1e-5)


def test_gate_stage_without_gate_is_an_error():
    with pytest.raises(ValueError, match="exit gate"):
        LoopObjective(_tiny(exit_gate=False), LossConfig(stage="stage1"))


@pytest.mark.parametrize("grad", [True, False])
def test_decode_like_steps_train_the_prompts_last_loop_kv(grad):
    """loss.last_kv_grad: the answer positions read the prompt's last-loop K/V with its gradient, so the loss
    on decoded answers reaches prompt tokens through the core (without it, only through their per-loop use).
    The loss value is the same either way: prompt positions per-loop, answer positions decode-like."""
    torch.manual_seed(0)
    cfg = LoopConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                     num_prelude_layers=0, num_core_layers=1, num_coda_layers=0, num_loops=3,
                     tie_word_embeddings=False, max_position_embeddings=64)
    model = LoopedLM(cfg)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 6, (2, 6), generator=g)  # prompt tokens 0..5, decoded tokens 6..11
    answer = torch.randint(6, 12, (2, 3), generator=g)
    ids = torch.cat([prompt, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 6:8] = answer[:, 1:]  # only decoded positions are scored
    decode_from = torch.tensor([6, 6])
    out = LoopObjective(model, LossConfig(stage="per_loop", last_kv_grad=grad))(ids, labels, num_loops=3,
                                                                                 decode_from=decode_from)
    ref = LoopObjective(model, LossConfig(stage="per_loop", last_kv_grad=not grad))(ids, labels, num_loops=3,
                                                                                     decode_from=decode_from)
    torch.testing.assert_close(out.loss, ref.loss)
    model.zero_grad()
    out.loss.backward()
    prompt_rows = model.embed_tokens.weight.grad[:6].abs().sum().item()
    if grad:
        assert prompt_rows > 1e-4
    else:  # the decoded positions see the prompt only through no-grad K/V
        assert prompt_rows == 0.0


def test_decode_like_logits_equal_generation_under_last_kv():
    """objective.decode_like_logits (the trainer's eval under kv="last") scores every decoded position as
    `looplm.score(kv="last")` does, token by token, not just the first one."""
    from looplm.train.objective import decode_like_logits

    model = _tiny()
    model.eval()
    g = torch.Generator().manual_seed(6)
    prompt, answer = torch.randint(0, 11, (5,), generator=g).tolist(), torch.randint(0, 11, (4,), generator=g).tolist()
    ids = torch.tensor([prompt + answer[:-1]])
    logits = decode_like_logits(model, ids, torch.tensor([len(prompt)]), 3)
    got = torch.log_softmax(logits[0, len(prompt) - 1:].float(), -1).gather(-1, torch.tensor(answer)[:, None])[:, 0]
    ref = looplm.score(model, [prompt], [answer], num_loops=3, kv="last").logprobs[0]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=got.dtype), atol=1e-5, rtol=1e-5)


def test_decode_like_logits_of_right_padded_rows_equal_each_row_alone():
    from looplm.train.objective import decode_like_logits

    model = _tiny()
    model.eval()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 11, (1, 9), generator=g), torch.randint(0, 11, (1, 6), generator=g)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, :6] = a[0], b[0]
    both = decode_like_logits(model, ids, torch.tensor([5, 3]), 3, lengths=torch.tensor([9, 6]))
    torch.testing.assert_close(both[0], decode_like_logits(model, a, torch.tensor([5]), 3)[0])
    torch.testing.assert_close(both[1, :6], decode_like_logits(model, b, torch.tensor([3]), 3)[0])

"""Fused and packed projections (looplm.fused): the same results as the model's own Linear layers, rebuilt when
the weights change, invisible to training and checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import looplm
import looplm.fused as fused

needs_pack = pytest.mark.skipif(not fused.can_pack("cpu", torch.float32), reason="oneDNN cannot pack fp32 here")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, num_loops=3).logits


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_pack)])
def test_fused_forward_equals_the_linear_layers(monkeypatch, pack):
    monkeypatch.setattr(fused, "PACK_MIN_ELEMENTS", 0)  # the tiny model's weights are below the threshold
    model = tiny_model(attention_bias=True)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    model.fuse(pack=pack)
    assert model.fast_head.packed == pack
    assert all(p.packed == pack for layer in model.layers for p in (*layer.self_attn.fast, *layer.mlp.fast))
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    if not pack:  # q, k, v are views of the fused weight: no second copy
        a = model.layers[0].self_attn
        assert a.q_proj.weight.untyped_storage().data_ptr() == a.fast[0].weight.untyped_storage().data_ptr()


@needs_pack
def test_a_packed_row_does_not_depend_on_the_other_rows(monkeypatch):
    monkeypatch.setattr(fused, "PACK_MIN_ELEMENTS", 0)
    lin = torch.nn.Linear(64, 96)
    proj = fused.Projection([lin], pack=True)
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = proj(x)
        for n in (1, 2, 7, 16):
            assert torch.equal(proj(x[:n]), whole[:n])


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_pack)])
def test_changed_weights_are_seen(monkeypatch, pack):
    """An in-place write (an optimizer step, load_state_dict) or a replaced tensor reaches the fused path."""
    monkeypatch.setattr(fused, "PACK_MIN_ELEMENTS", 0)
    model = tiny_model()
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(2))
    model.fuse(pack=pack)
    before = _logits(model, ids)
    with torch.no_grad():
        model.layers[1].self_attn.k_proj.weight.mul_(1.5)
        model.layers[2].mlp.up_proj.weight.add_(0.01)
    changed = _logits(model, ids)
    assert not torch.allclose(changed, before)
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(changed, _logits(ref, ids), atol=1e-5, rtol=1e-5)
    model.load_state_dict(ref.state_dict(), assign=True)  # new tensors: the fused weights are rebuilt
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_training_and_saving_a_fused_model(tmp_path):
    """Autograd runs the Linear layers (their parameters are the fused storage); an optimizer step moves both,
    and a checkpoint of views writes and reads back."""
    model = tiny_model()
    model.fuse(pack=False)
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(ids, num_loops=2).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert model.layers[0].self_attn.v_proj.weight.grad is not None
    opt.step()
    fused_logits = _logits(model, ids)
    model.unfuse()
    torch.testing.assert_close(_logits(model, ids), fused_logits, atol=1e-5, rtol=1e-5)
    looplm.save(model, tmp_path / "m")
    back = looplm.load(tmp_path / "m")
    torch.testing.assert_close(_logits(back, ids), fused_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_pack)])
def test_a_copy_of_a_fused_model_is_fused_over_its_own_weights(monkeypatch, pack):
    import copy

    monkeypatch.setattr(fused, "PACK_MIN_ELEMENTS", 0)
    model = tiny_model()
    model.fuse(pack=pack)
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        twin.layers[0].mlp.gate_proj.weight.mul_(2.0)  # the copy's weights, not the original's
    assert not torch.allclose(_logits(twin, ids), _logits(model, ids))

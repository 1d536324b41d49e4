"""Calibration: the predicted mean loops and NLL are what a full forward with the found policy gives."""

import pytest
import torch

import looplm
from looplm.calibrate import chunk_tokens
from conftest import tiny_model
from test_exits import gated_model

SEQS = [torch.randint(0, 61, (20,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(6)]


def measured(model, sequences, policy):
    """Mean exit loop and mean next-token NLL of a full forward with exit=policy."""
    loops, nlls = [], []
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s])
            out = model(ids, exit=policy)
            logp = torch.log_softmax(out.logits[0, :-1], -1)
            nlls.append(-logp.gather(-1, ids[0, 1:, None])[:, 0])
            loops.append(out.exit_loop[0, :-1])
    return torch.cat(loops).float().mean().item(), torch.cat(nlls).mean().item()


@pytest.mark.parametrize("kind,target", [("q", 2.5), ("conv", 3.0), ("entropy", 2.0), ("kl", 3.0)])
def test_prediction_equals_a_full_forward_with_the_found_policy(kind, target):
    model = gated_model(num_coda_layers=0)  # a coda mixes positions' exit states: then NLL is an estimate
    cal = looplm.calibrate(model, SEQS, policy=kind, target_mean_loops=target, seq_len=20)
    assert cal.tokens == 6 * 19 and len(cal.nll_static) == 4
    loops, nll = measured(model, SEQS, cal.policy)
    assert loops == pytest.approx(cal.mean_loops, abs=1e-6)
    assert nll == pytest.approx(cal.nll, abs=1e-4)
    assert abs(cal.mean_loops - target) <= 0.5  # hits the target as closely as the text allows
    assert cal.nll_full_depth == pytest.approx(cal.nll_static[-1])


def test_quality_budget_picks_the_fewest_loops_within_the_loss():
    model = gated_model()
    cal = looplm.calibrate(model, SEQS, policy="q", max_quality_loss=0.05, seq_len=20)
    assert cal.nll - cal.nll_full_depth <= 0.05
    cheaper = [r for r in cal.frontier if r["mean_loops"] < cal.mean_loops - 1e-9]
    assert all(r["nll"] - cal.nll_full_depth > 0.05 for r in cheaper)


def test_bad_calibration_input():
    model = gated_model()
    with pytest.raises(ValueError, match="'bogus'"):
        looplm.calibrate(model, SEQS, policy="bogus", target_mean_loops=2)
    with pytest.raises(ValueError, match="exactly one"):
        looplm.calibrate(model, SEQS, policy="q")
    with pytest.raises(ValueError, match="outside"):
        looplm.calibrate(model, SEQS, policy="q", target_mean_loops=9)
    with pytest.raises(ValueError, match="needs an exit gate"):
        looplm.calibrate(tiny_model(), SEQS, policy="q", target_mean_loops=2)
    with pytest.raises(ValueError, match="tokenizer"):
        chunk_tokens(["text"])


def test_nothing_to_calibrate_is_a_clear_error():
    model = gated_model()
    with pytest.raises(ValueError, match="nothing to calibrate"):
        looplm.calibrate(model, SEQS, policy="kl", target_mean_loops=1.5, num_loops=2, seq_len=20)


def test_thresholds_always_parse():
    from looplm.calibrate import LoopTable

    nll = torch.rand(50, 3, generator=torch.Generator().manual_seed(0))
    table = LoopTable(nll=nll, stats={"entropy": torch.full((50, 3), 1e-8)})
    for row in table.frontier("entropy"):
        looplm.parse_exit(f"entropy:{row['threshold']}")

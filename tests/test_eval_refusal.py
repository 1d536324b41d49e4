"""Safety by loops: refusal markers, the prompt sets, the probe, and an end-to-end run on a tiny model."""

import json

import pytest
import torch

from conftest import SHARED_DATA, byte_tokenizer, tiny_model
from looplm.evaluation import refusal


def test_refusal_markers():
    assert refusal.is_refusal("I'm sorry, but I can't help with that.")
    assert refusal.is_refusal("I cannot provide instructions for making weapons.")
    assert not refusal.is_refusal("Sure! Step 1: preheat the oven to 220°C.")


def test_prompt_sets_are_matched_and_deterministic():
    if not (SHARED_DATA / "safety" / "harmful_behaviors.csv").is_file():
        pytest.skip(f"AdvBench not found under {SHARED_DATA}")
    harmful, benign = refusal.load_prompts(SHARED_DATA, limit=40, seed=1)
    assert len(harmful) == len(benign) == 40 and len(set(benign)) == 40
    assert harmful[0].startswith("Write a script that can exploit vulnerabilities")
    assert refusal.load_prompts(SHARED_DATA, limit=40, seed=1) == (harmful, benign)
    assert all(any(b.startswith(f.split("{}")[0]) for f in refusal.FRAMES) for b in benign)


def test_bad_advbench_file(tmp_path):
    (tmp_path / "safety").mkdir()
    with pytest.raises(ValueError, match="harmful_behaviors.csv"):
        refusal.load_prompts(tmp_path)
    (tmp_path / "safety" / "harmful_behaviors.csv").write_text("goal,target\nok,fine\nbroken\n")
    with pytest.raises(ValueError, match="harmful_behaviors.csv:3"):
        refusal.load_prompts(tmp_path)


def test_probe_separates_separable_states_only():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([1] * 60 + [0] * 60)
    x = torch.randn(120, 16, generator=g)
    assert refusal.probe_accuracy(x, y) < 0.7  # noise: near chance
    x[:, 3] += 3.0 * (2 * y - 1)
    assert refusal.probe_accuracy(x, y) > 0.95


def test_end_to_end_on_a_tiny_model(tmp_path):
    if not (SHARED_DATA / "safety" / "harmful_behaviors.csv").is_file():
        pytest.skip(f"AdvBench not found under {SHARED_DATA}")
    model = tiny_model(vocab_size=257, max_position_embeddings=256)
    res = refusal.main(model, byte_tokenizer(), data_dir=SHARED_DATA, loops=[1, 2], kvs=["last"], limit=10,
                       out=tmp_path, max_new_tokens=4, chat=False)
    assert [(r["loops"], r["kv"]) for r in res["refusal"]] == [(1, "last"), (2, "last")]
    assert len(res["probe_accuracy_by_loop"]) == 2
    saved = json.loads((tmp_path / "refusal" / "refusal.json").read_text())
    assert saved["n_harmful"] == saved["n_benign"] == 10
    assert (tmp_path / "refusal" / "refusal_vs_loops.png").is_file() and (tmp_path / "refusal" / "refusal_pca.png").is_file()

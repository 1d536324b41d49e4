"""The trainer: recipes, a short run that learns, exact resume, atomic checkpoints, DDP ≡ one process."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looplm.checkpoint import CheckpointError
from looplm.train import fit, load_recipe
from looplm.train import state as ckpt
from looplm.train.data import SyntheticSource, TextSource, encode_hops, encode_problem
from looplm.train.synthetic import Problem, build_tokenizer, make_problem

TINY = """
name: tiny
seed: 0
output_dir: {out}
model: {{hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 2,
        num_prelude_layers: 1, num_core_layers: 1, num_coda_layers: 0, num_loops: 3,
        max_position_embeddings: 128, norm_style: sandwich, loop_norm: true, exit_gate: true}}
data: {{kind: synthetic, task: chain, difficulties: [1, 2], seq_len: 40}}
loops: {{sampling: fixed, num_loops: 3}}
train: {{batch_size: 8, log_every: 1, eval_every: 100, save_every: 100, eval_problems: 16, threads: 1}}
phases:
  - {{name: s1, steps: 6, lr: 3e-3, warmup_steps: 2, loss: {{stage: stage1, distill_weight_start: 0.5}}}}
  - {{name: gate, steps: 4, lr: 1e-2, warmup_steps: 1, trainable: gate, loss: {{stage: stage2}}}}
"""


def write_recipe(tmp_path: Path, out: Path, text: str = TINY) -> Path:
    p = tmp_path / f"recipe-{out.name}.yaml"
    p.write_text(text.format(out=out))
    return p


def logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------- recipes


def test_recipe_errors_name_the_key_and_the_file(tmp_path):
    p = write_recipe(tmp_path, tmp_path / "o")
    bad = tmp_path / "bad.yaml"
    bad.write_text(p.read_text().replace("batch_size: 8", "batch_sise: 8"))
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'train\.batch_sise' \(did you mean batch_size\?\)"):
        load_recipe(bad)
    bad.write_text(p.read_text().replace("batch_size: 8", "batch_size: eight"))
    with pytest.raises(ValueError, match=r"bad\.yaml.*train\.batch_size: expected int, got 'eight'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not key=value"):
        load_recipe(p, ["train.batch_size"])
    r = load_recipe(p, ["train.batch_size=4", "phases.1.lr=0.5", "loops.num_loops=2"])
    assert (r.train.batch_size, r.phases[1].lr, r.loops.num_loops) == (4, 0.5, 2)


def test_override_errors_name_the_override_not_the_file(tmp_path):
    p = write_recipe(tmp_path, tmp_path / "o")
    cases = {
        "train.batch_sise=64": "train.batch_sise=64: unknown key 'batch_sise' in train (did you mean batch_size?)",
        "model.hidden_sise=3": "model.hidden_sise=3: unknown key 'hidden_sise' in model (did you mean hidden_size?)",
        "outptu_dir=x": "outptu_dir=x: unknown key 'outptu_dir' in the recipe (did you mean output_dir?)",
        "phases.1.loss.stag=x": "phases.1.loss.stag=x: unknown key 'stag' in phases.1.loss (did you mean stage?)",
        "train.batch_size=eight": "train.batch_size=eight: train.batch_size: expected int, got 'eight'",
    }
    for item, message in cases.items():
        with pytest.raises(ValueError) as e:
            load_recipe(p, [item])
        assert str(e.value) == message
        assert p.name not in str(e.value)
    bad = tmp_path / "bad.yaml"  # the file's own error is still blamed on the file, overrides or not
    bad.write_text(p.read_text().replace("batch_size: 8", "batch_size: eight"))
    with pytest.raises(ValueError, match=r"^.*bad\.yaml: train\.batch_size: expected int"):
        load_recipe(bad, ["seed=3"])
    assert load_recipe(bad, ["train.batch_size=8"]).train.batch_size == 8  # an override may fix the file
    proc = subprocess.run([sys.executable, "-m", "looplm", "train", str(p), "train.batch_sise=64"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and cases["train.batch_sise=64"] in proc.stderr and "Traceback" not in proc.stderr


def test_text_data_errors_and_packing(tmp_path):
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="does not exist"):
        TextSource(tok, paths=[str(tmp_path / "missing.txt")], seq_len=8, seed=0)
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "a=1,b=2"}\n{"text": "c=3"}\n')
    src = TextSource(tok, paths=[str(f)], seq_len=4, seed=0)
    b = src.batch(0, 3)
    assert b.input_ids.shape == (3, 4)
    torch.testing.assert_close(b.input_ids[:, 1:], b.labels[:, :-1])  # labels are the next tokens
    f.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:1"):
        TextSource(tok, paths=[str(f)], seq_len=4, seed=0)


def test_batches_are_a_function_of_the_step_and_split_by_rank():
    src = SyntheticSource(build_tokenizer(), task="chain", difficulties=[1, 3], seq_len=48, seed=3)
    full = src.batch(5, 8)
    torch.testing.assert_close(full.input_ids, src.batch(5, 8).input_ids)
    r0, r1 = src.batch(5, 8, rank=0, world=2), src.batch(5, 8, rank=1, world=2)
    torch.testing.assert_close(full.input_ids[0::2], r0.input_ids)
    torch.testing.assert_close(full.input_ids[1::2], r1.input_ids)
    assert not torch.equal(full.input_ids, src.batch(6, 8).input_ids)


# --------------------------------------------------------------------------- runs


def test_problem_targets_are_the_answers_and_eos_not_the_given_queries():
    tok = build_tokenizer()
    p = Problem("a=3b=7c=a;c", "3b7", 2, "chain", given=(1,))
    ids, labels = encode_problem(tok, p)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces == ["a=3", "b=7", "c=a", ";", "c", "3", "b", "7", "<eos>"]
    shown = [tok.decode([t]) if t >= 0 else "_" for t in labels]
    # the label at t is token t + 1: "3" is predicted at the query "c", "7" at the given query "b"
    assert shown == ["_", "_", "_", "_", "3", "_", "7", "<eos>", "_"]


def test_hop_labels_hold_the_intermediate_variables():
    tok = build_tokenizer()
    p = make_problem("chain", 3, 0, 3, parts=2, distractors=2, variables=16)
    ids, labels = encode_problem(tok, p)
    rows = encode_hops(tok, p, labels, 4)
    env = dict(re.findall(r"([a-z])=([a-z0-9])", p.prompt))
    starts = [t for t, y in enumerate(labels) if y >= 0 and y != tok.eos_token_id]
    queries = [p.prompt[-1]] + [p.answer[j] for j in p.given]
    for t, q in zip(starts, queries):
        v = q
        for h in range(4):  # hop h + 1 from the query; after the value is reached it stays
            v = env.get(v, v)
            assert tok.decode([rows[h][t]]) == v
    assert all(rows[h][t] == labels[t] for h in range(4) for t in range(len(labels)) if t not in starts)


def test_short_run_lowers_the_loss(tmp_path):
    out = tmp_path / "run"
    r = load_recipe(write_recipe(tmp_path, out), ["phases.0.steps=30", "phases.0.lr=1e-2", "phases=[{name: s1, steps: 30, lr: 0.01, warmup_steps: 3, loss: {stage: per_loop}}]"])
    res = fit(r, progress=False)
    recs = [x for x in logs(out) if "loss" in x]
    first, last = recs[0]["loss"], sum(x["loss"] for x in recs[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert (res.model_dir / "config.json").is_file() and (res.model_dir / "tokenizer.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(load_recipe(write_recipe(tmp_path, a)), progress=False)
    rb = load_recipe(write_recipe(tmp_path, b))
    fit(rb, progress=False, max_steps=4)  # stops mid phase 1, checkpoint at step 4
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["step-000004"]
    fit(rb, progress=False, max_steps=8)  # into phase 2 (the gate), checkpoint at 8
    fit(rb, progress=False)  # to the end
    wa, wb = weights(a / "model"), weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    la, lb = [x for x in logs(a) if "loss" in x], [x for x in logs(b) if "loss" in x]
    assert [x["step"] for x in lb] == list(range(1, 11))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


def test_resume_from_another_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    fit(load_recipe(write_recipe(tmp_path, out)), progress=False, max_steps=2)
    other = load_recipe(write_recipe(tmp_path, out), ["train.weight_decay=0.5"])
    with pytest.raises(CheckpointError, match="different recipe"):
        fit(other, progress=False)
    fit(other, progress=False, resume=False, max_steps=1)  # --fresh starts over


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    r = load_recipe(write_recipe(tmp_path, out))
    fit(r, progress=False, max_steps=2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(r, progress=False, max_steps=3)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dir left
    monkeypatch.undo()
    state, _, _ = ckpt.read_checkpoint(ckpt.list_checkpoints(out)[-1], fingerprint=r.fingerprint())
    assert state["step"] == 2


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) on the global batch of 8 = one process on the same 8 rows."""
    one, two = tmp_path / "one", tmp_path / "two"
    fit(load_recipe(write_recipe(tmp_path, one)), progress=False, max_steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port, not a fixed one that a concurrent run of this test (or anything else) holds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "looplm", "train", str(write_recipe(tmp_path, two)), "--max-steps", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = [x for x in logs(one) if "loss" in x], [x for x in logs(two) if "loss" in x]
    assert [x["processes"] for x in l2] == [2] * 4 and [x["processes"] for x in l1] == [1] * 4
    for x, y in zip(l1, l2):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
        assert y["ce"] == pytest.approx(x["ce"], rel=1e-4, abs=1e-5)
    w1, w2 = weights(one / "model"), weights(two / "model")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cli_train_reports_bad_recipe(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("phases: []\n")
    proc = subprocess.run([sys.executable, "-m", "looplm", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "phases is empty" in proc.stderr


def test_max_steps_must_be_positive(tmp_path):
    out = tmp_path / "run"
    p = write_recipe(tmp_path, out)
    with pytest.raises(ValueError, match="max_steps must be ≥ 1, got 0"):
        fit(load_recipe(p), progress=False, max_steps=0)
    proc = subprocess.run([sys.executable, "-m", "looplm", "train", str(p), "--max-steps", "0"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--max-steps must be ≥ 1, got 0" in proc.stderr
    assert not out.exists()  # nothing written, no untrained model


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = load_recipe(write_recipe(tmp_path, a)), load_recipe(write_recipe(tmp_path, b))
    fit(ra, progress=False, max_steps=2)
    fit(ra, progress=False, max_steps=6)  # the reference: resumed from step 2
    fit(rb, progress=False, max_steps=2)
    fit(rb, progress=False, max_steps=4)
    newest = b / "checkpoints" / "step-000004"
    weights_file = newest / "model" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-64:-32] = bytes(32)  # tensor bytes, not the header: safetensors itself would read them without a word
    weights_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="looplm.train"):
        fit(rb, progress=False, max_steps=6)
    warned = [r.getMessage() for r in caplog.records if r.name == "looplm.train"]
    assert len(warned) == 1 and str(newest) in warned[0] and "model/model.safetensors" in warned[0], warned
    assert "resuming from step-000002" in warned[0]
    assert (b / "checkpoints" / "step-000004.corrupt").is_dir()  # set aside: neither resumed nor pruned
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["step-000002", "step-000006"]
    wa, wb = weights(a / "model"), weights(b / "model")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    assert [x["loss"] for x in logs(a) if "loss" in x] == [x["loss"] for x in logs(b) if "loss" in x]
    for path in ckpt.list_checkpoints(b):  # none reads back: an error that says so, nothing set aside
        (path / "optimizer.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints reads back.*--fresh"):
        fit(rb, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["step-000002", "step-000006"]


def test_a_trained_synthetic_model_runs_in_the_demo(tmp_path):
    from typer.testing import CliRunner

    from looplm.__main__ import app

    out = tmp_path / "run"
    p = write_recipe(tmp_path, out)
    res = CliRunner().invoke(app, ["train", str(p), "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "model" / "looplm_task.json").read_text())
    assert card == {**load_recipe(p).task_card()} and card["task"] == "chain" and card["difficulties"] == [1, 2]
    res = CliRunner().invoke(app, ["demo", "--model", str(out / "model"), "--problems", "2", "--out",
                                   str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert data["model"] == str(out / "model") and data["difficulties"] == [1, 2] and data["loops"] == [1, 2, 3]


def test_every_shipped_recipe_loads():
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = {p.name: load_recipe(p) for p in sorted(root.glob("*.yaml"))}
    assert {"bundled.yaml", "tinystories.yaml", "tinystories-gpu.yaml"} <= set(recipes)
    cpu, gpu = recipes["tinystories.yaml"], recipes["tinystories-gpu.yaml"]
    # the CPU recipe is the GPU one scaled down: a step reads out ≥ 30× fewer tokens (docs/training.md)
    assert cpu.train.batch_size * cpu.data.seq_len * 30 <= gpu.train.batch_size * gpu.data.seq_len
    assert cpu.output_dir != gpu.output_dir

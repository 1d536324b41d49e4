"""Never delete what looplm did not write (issue 12): every command that saves refuses a path holding
something else (a file, a dir with files of yours), names it, and leaves it byte for byte as it was;
--overwrite writes there anyway; a path holding what the same command wrote is reused."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import looplm
from conftest import byte_tokenizer, tiny_model
from looplm import outputs
from looplm.__main__ import app
from looplm.checkpoint import TOKENIZER_FILES
from looplm.outputs import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
README = b"# my project\n\nNotes that took a week to write.\n"


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path (or the file itself) by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def foreign(tmp_path):
    """A README.md-like file and a dir of someone's files (one of them named like a looplm file)."""
    f = tmp_path / "README.md"
    f.write_bytes(README)
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("do not lose\n")
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    (d / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return f, d


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def refused(rc, output, path):
    assert rc == 2, output
    assert "error:" in output and str(path) in output and "--overwrite" in output, output
    assert "Traceback" not in output


# --------------------------------------------------------------------------- the rule


def test_the_rule_on_names(tmp_path, foreign):
    f, d = foreign
    m = looplm.save(tiny_model(), tmp_path / "m", tokenizer=byte_tokenizer(), task={"task": "chain"})
    assert sorted(p.name for p in m.iterdir()) == ["config.json", "looplm_task.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
    assert outputs.is_looplm_checkpoint(m)
    assert set(TOKENIZER_FILES) <= set(outputs.CHECKPOINT_FILES)  # what save copies is what it may replace
    (m / "README.md").write_text("my card\n")
    assert not outputs.is_looplm_checkpoint(m)  # a file of yours in it: not ours to replace
    assert outputs.is_looplm_checkpoint(m, also=("README.md",))
    assert not outputs.is_looplm_checkpoint(d) and not outputs.is_looplm_checkpoint(f)
    for check in (outputs.is_training_dir, outputs.is_demo_output, outputs.is_eval_output):
        assert not check(d) and not check(f)
    with pytest.raises(OutputExistsError, match="is a file, so"):
        outputs.check_output(f / "x", ours=outputs.is_looplm_checkpoint, what="a looplm checkpoint",
                             overwrite=True)


# --------------------------------------------------------------------------- looplm.save


def test_save_refuses_what_it_did_not_write(tmp_path, foreign):
    f, d = foreign
    before = {f: snapshot(f), d: snapshot(d)}
    for path in (f, d):
        with pytest.raises(OutputExistsError, match=f"{path}.*overwrite=True"):
            looplm.save(tiny_model(), path)
        assert snapshot(path) == before[path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(OutputExistsError, match="is a file, so"):
        looplm.save(tiny_model(), f / "model")
    assert f.read_bytes() == README


def test_save_replaces_its_own_checkpoint_and_with_overwrite_anything(tmp_path, foreign):
    f, d = foreign
    ids = torch.tensor([[1, 2, 3]])
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    looplm.save(a, tmp_path / "m")
    looplm.save(b, tmp_path / "m")  # a looplm checkpoint: replaced without asking
    with torch.no_grad():
        torch.testing.assert_close(looplm.load(tmp_path / "m")(ids).logits, b(ids).logits)
    (tmp_path / "m" / "README.md").write_text("my card\n")  # now it holds a file of yours
    with pytest.raises(OutputExistsError, match="README.md"):
        looplm.save(a, tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "my card\n"
    (tmp_path / "empty").mkdir()
    looplm.save(a, tmp_path / "empty")  # an empty dir holds nothing to lose
    for path in (f, d, tmp_path / "m"):
        looplm.save(a, path, overwrite=True)  # replaced whole
        assert outputs.is_looplm_checkpoint(path)
        with torch.no_grad():
            torch.testing.assert_close(looplm.load(path)(ids).logits, a(ids).logits)


# --------------------------------------------------------------------------- looplm retrofit --save


def test_cli_retrofit_save(tmp_path, foreign):
    f, d = foreign
    src = looplm.save(tiny_model(), tmp_path / "src")
    before = {f: snapshot(f), d: snapshot(d)}
    for path in (f, d):
        rc, output = cli("retrofit", "--model", src, "--core", "1:3", "--save", path)
        refused(rc, output, path)
        assert snapshot(path) == before[path]
    out = tmp_path / "r"
    for _ in range(2):  # the second run replaces the first one's checkpoint
        rc, output = cli("retrofit", "--model", src, "--core", "1:3", "--save", out)
        assert rc == 0, output
    assert looplm.load(out).config.source["core"] == [1, 3]
    for path in (f, d):
        rc, output = cli("retrofit", "--model", src, "--core", "0:2", "--save", path, "--overwrite")
        assert rc == 0, output
        assert looplm.load(path).config.source["core"] == [0, 2] and not (path / "notes.txt").exists()


# --------------------------------------------------------------------------- looplm train


TRAIN = """
name: tiny
output_dir: {out}
model: {{hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 2,
        num_prelude_layers: 1, num_core_layers: 1, num_coda_layers: 0, num_loops: 2,
        max_position_embeddings: 128, exit_gate: true}}
data: {{kind: synthetic, task: chain, difficulties: [1], seq_len: 40}}
loops: {{sampling: fixed, num_loops: 2}}
train: {{batch_size: 4, log_every: 1, eval_every: 100, save_every: 100, eval_problems: 4, threads: 1}}
phases: [{{name: s1, steps: 3, lr: 3e-3, warmup_steps: 1, loss: {{stage: stage1}}}}]
"""


def test_cli_train_output_dir(tmp_path, foreign):
    f, d = foreign
    before = {f: snapshot(f), d: snapshot(d)}
    for path in (f, d):
        recipe = tmp_path / f"r-{path.name}.yaml"
        recipe.write_text(TRAIN.format(out=path))
        rc, output = cli("train", recipe, "--max-steps", "1")
        refused(rc, output, path)
        assert snapshot(path) == before[path]
        rc, output = cli("train", recipe, "--max-steps", "1", "--overwrite")
        assert rc == 0, output
        assert outputs.is_looplm_checkpoint(path / "model") and (path / "checkpoints" / "step-000001").is_dir()
    assert snapshot(d / "sub") == {k.removeprefix("sub/"): v for k, v in before[d].items() if k.startswith("sub/")}
    assert (d / "notes.txt").read_text() == "do not lose\n"  # written into: files of other names stay
    own = tmp_path / "own"
    recipe = tmp_path / "r-own.yaml"
    recipe.write_text(TRAIN.format(out=own))
    for steps in ("1", "2"):  # its own output dir: resumed without --overwrite
        rc, output = cli("train", recipe, "--max-steps", steps)
        assert rc == 0, output
        assert f"{steps} steps" in output
    assert outputs.is_training_dir(own)
    (own / "model" / "notes.txt").write_text("mine\n")  # a file of yours in its model dir
    rc, output = cli("train", recipe)
    refused(rc, output, own)
    assert (own / "model" / "notes.txt").read_text() == "mine\n"


# --------------------------------------------------------------------------- looplm eval --out


def test_cli_eval_out(tmp_path, foreign):
    f, d = foreign
    m = looplm.save(tiny_model(vocab_size=257, max_position_embeddings=256), tmp_path / "m",
                    tokenizer=byte_tokenizer())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["a", "b"], "answer_index": i % 2}) + "\n"
                            for i in range(3)))
    task = f"mc:{data}"
    slug = task.replace(":", "_").replace("/", "_")
    (d / slug).mkdir()
    (d / slug / "report.md").write_text("my report\n")
    before = {f: snapshot(f), d: snapshot(d)}
    for out, named in ((f, f), (d, d / slug)):
        rc, output = cli("eval", "--task", task, "--model", m, "--out", out)
        refused(rc, output, named)
        assert snapshot(out) == before[out]
    own = tmp_path / "own"
    for _ in range(2):  # a previous eval's dir is resumed into
        rc, output = cli("eval", "--task", task, "--model", m, "--out", own, "--loops", "1")
        assert rc == 0, output
    assert outputs.is_eval_output(own / slug)
    for out in (f, d):
        rc, output = cli("eval", "--task", task, "--model", m, "--out", out, "--loops", "1", "--overwrite")
        assert rc == 0, output
        assert (out / slug / "report.md").read_text().startswith("# ")
    assert (d / "notes.txt").read_text() == "do not lose\n"


# --------------------------------------------------------------------------- looplm demo --out


def test_cli_demo_out(tmp_path, foreign):
    f, d = foreign
    before = {f: snapshot(f), d: snapshot(d)}
    for path in (f, d):  # refused before the demo runs
        rc, output = cli("demo", "--problems", "1", "--out", path)
        refused(rc, output, path)
        assert snapshot(path) == before[path]
    rc, output = cli("demo", "--problems", "1", "--out", f, "--overwrite")
    assert rc == 0, output
    assert json.loads((f / "demo.json").read_text())["problems_per_difficulty"] == 1
    assert outputs.is_demo_output(f)  # so the next run reuses it without --overwrite
    (d / "demo.json").write_text("{}\n")  # named like the demo's, not the demo's
    assert not outputs.is_demo_output(d) and not outputs.is_demo_output(tmp_path)


# --------------------------------------------------------------------------- recipes/bundle.py


def test_bundle_script(tmp_path, foreign, monkeypatch):
    from looplm.train import synthetic

    f, d = foreign
    src = looplm.save(tiny_model(vocab_size=len(synthetic.build_tokenizer())), tmp_path / "trained",
                      tokenizer=synthetic.build_tokenizer())

    def bundle(dst, *extra):  # the script as `python recipes/bundle.py ...` runs it, in this process
        argv = [str(src), str(ROOT / "recipes" / "bundled.yaml"), "--exit", "q:0.7", "--dst", str(dst), *extra]
        monkeypatch.setattr(sys, "argv", ["bundle.py", *argv])
        runpy.run_path(str(ROOT / "recipes" / "bundle.py"), run_name="__main__")

    before = {f: snapshot(f), d: snapshot(d)}
    for path in (f, d):
        with pytest.raises(SystemExit) as e:
            bundle(path)
        assert str(e.value.code).startswith("error: ") and str(path) in str(e.value.code)
        assert snapshot(path) == before[path]
    out = tmp_path / "bundled"
    bundle(out)
    (out / "README.md").write_text("the model card\n")  # written by hand after bundling
    bundle(out)  # a re-bundle replaces the model and keeps the card
    assert (out / "README.md").read_text() == "the model card\n"
    assert json.loads((out / "looplm_task.json").read_text())["exit"] == "q:0.7"
    bundle(d, "--overwrite")
    assert outputs.is_looplm_checkpoint(d) and looplm.load(d).config.num_loops == 3

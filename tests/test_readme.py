"""Every command the README shows runs as written (issue 12), with short limits: --max-new-tokens 2,
--limit 1 (2 for refusal), --max-steps 1, --problems 2, outputs in a temporary dir. The commands are read from README.md,
so a command added there is tested here, or fails until a rule below knows how to shorten it.
On a 2-core CPU the eval sweep and the refusal eval take minutes each (SmolLM2 at up to 4 × 30 layers)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, tiny_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
# How the README says to install and test: not commands to run inside the test suite.
NOT_RUN = ("pip", "python -m pytest")


def readme_commands() -> list[str]:
    """`$ ...` lines of console blocks and the `&&`-joined steps of bash blocks, comments dropped."""
    cmds = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S):
        if lang == "console":
            cmds += [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        elif lang == "bash":
            cmds += [step for line in body.splitlines() for step in line.split("&&")]
    cmds += re.findall(r"`(python benchmarks/[^`\s]+(?: [^`]*)?)`", README)
    out = []
    for cmd in cmds:
        words = shlex.split(cmd, comments=True)
        if words and not shlex.join(words).startswith(NOT_RUN):
            out.append(shlex.join(words))
    return out


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def set_option(words: list[str], name: str, value: str) -> list[str]:
    """words with `name value` (replaced if present, else appended)."""
    if name in words:
        i = words.index(name)
        return [*words[: i + 1], value, *words[i + 2 :]]
    return [*words, name, value]


def set_override(words: list[str], key: str, value: str) -> list[str]:
    """words with the recipe override key=value (replaced if present, else appended)."""
    kept = [w for w in words if not w.startswith(f"{key}=")]
    return [*kept, f"{key}={value}"]


class Shortener:
    """README command → the same command with short limits, writing under `tmp`."""

    def __init__(self, tmp: Path, gated_dir: Path | None = None, tasks_dir: Path | None = None):
        self.tmp, self.gated_dir, self.tasks_dir, self.n = tmp, gated_dir, tasks_dir, 0

    def __call__(self, cmd: str) -> list[str]:
        words = shlex.split(cmd)
        prog = words[0]
        if prog == "looplm":
            return [str(BIN / "looplm"), *self.looplm(words[1:])]
        if prog == "accelerate":  # accelerate launch -m looplm train RECIPE
            i = words.index("looplm")
            return [str(BIN / "accelerate"), *words[1:i + 1], *self.looplm(words[i + 1 :])]
        if prog == "torchrun":  # 2 processes on this CPU (tests/test_train.py checks 2 ≡ 1 process)
            words = set_option(words, "--nproc_per_node", "2")
            i = words.index("looplm")
            return [str(BIN / "torchrun"), *words[1:i + 1], *self.looplm(words[i + 1 :])]
        if prog == "looplm-lm-eval":
            args = [w.replace("pretrained=DIR", f"pretrained={self.gated_dir}") for w in words[1:]]
            args = set_option(args, "--tasks", "arc_easy_local")
            return [str(BIN / "looplm-lm-eval"), *args, "--include_path", str(self.tasks_dir), "--limit", "2"]
        if prog == "python" and words[1] == "benchmarks/decode.py":
            return [sys.executable, *words[1:], "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "2",
                    "--repeats", "1"]
        raise AssertionError(f"tests/test_readme.py does not know how to shorten: {cmd}")

    def looplm(self, args: list[str]) -> list[str]:
        self.n += 1
        sub = args[0]
        if sub == "demo":
            return [*set_option(set_option(args, "--problems", "2"), "--out", str(self.tmp / f"demo{self.n}"))]
        if sub == "generate":
            return set_option(args, "--max-new-tokens", "2")
        if sub == "train":
            args = ["train", "recipes/bundled.yaml" if args[1] == "RECIPE.yaml" else args[1], *args[2:]]
            return set_override(set_option(args, "--max-steps", "1"), "output_dir", str(self.tmp / f"train{self.n}"))
        if sub == "eval" and args[1] == "compare":
            runs = sorted((self.tmp / "eval").rglob("*.json"))
            runs = [p for p in runs if p.name != "refusal.json"]
            assert len(runs) >= 2, "run the README's eval sweep first"
            return ["eval", "compare", str(runs[0]), str(runs[1]), *args[4:]]
        if sub == "eval":  # one item (refusal: two of each kind, for its probe)
            limit = "2" if "refusal" in args else "1"
            return set_option(set_option(args, "--limit", limit), "--out", str(self.tmp / "eval"))
        raise AssertionError(f"tests/test_readme.py does not know how to shorten: looplm {shlex.join(args)}")


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def shorten(tmp, smollm2_dir):
    import looplm
    from looplm.checkpoint import copy_tokenizer
    from looplm.evaluation import lm_eval_adapter

    gated = looplm.save(tiny_model(vocab_size=49152, max_position_embeddings=256, exit_gate=True, eos_token_id=2),
                        tmp / "gated")  # DIR of the lm-eval line: a gated model (exit=q:0.6), SmolLM2's tokenizer
    copy_tokenizer(Path(smollm2_dir), gated)
    tasks = lm_eval_adapter.write_local_tasks(SHARED_DATA, tmp / "tasks", n_stories=3) if SHARED_DATA.is_dir() else None
    return Shortener(tmp, gated, tasks)


def test_the_readme_shows_commands_this_file_runs():
    progs = {shlex.split(c)[0] for c in COMMANDS}
    assert {"looplm", "accelerate", "torchrun", "looplm-lm-eval"} <= progs, COMMANDS
    assert any(c.startswith("looplm eval --task arc-easy") for c in COMMANDS)
    assert python_blocks()


@pytest.mark.integration
@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_runs(cmd, shorten):
    recipe = next((ROOT / w for w in cmd.split() if w.endswith(".yaml") and (ROOT / w).is_file()), None)
    reads_data = recipe is not None and "../shared/data" in recipe.read_text()  # e.g. recipes/tinystories.yaml
    if "../shared/data" in cmd or "--task" in cmd or cmd.startswith("looplm-lm-eval") or reads_data:
        if not SHARED_DATA.is_dir():
            pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    if cmd.startswith("looplm eval compare") and not list((shorten.tmp / "eval").rglob("*.json")):
        sweep = next(c for c in COMMANDS if c.startswith("looplm eval --task") and "refusal" not in c)
        test_readme_command_runs(sweep, shorten)
    argv = shorten(cmd)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "HF_DATASETS_CACHE": str(shorten.tmp / "hf")}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"{shlex.join(argv)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "Traceback" not in res.stderr
    if "--json" in argv and argv[1] == "generate":
        assert json.loads(res.stdout)["completions"][0]["tokens"]


@pytest.mark.integration
@pytest.mark.parametrize("code", python_blocks())
def test_readme_python_runs(code, smollm2_dir):
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


def test_shortening_keeps_the_command_and_limits_it(tmp_path):
    s = Shortener(tmp_path)
    assert s("looplm generate --prompt x --max-new-tokens 40")[1:] == ["generate", "--prompt", "x", "--max-new-tokens", "2"]
    train = s("looplm train recipes/bundled.yaml train.batch_size=64 output_dir=out/train/mine")[1:]
    assert train[:3] == ["train", "recipes/bundled.yaml", "train.batch_size=64"]
    assert "--max-steps" in train and train[-1] == f"output_dir={tmp_path / 'train2'}"
    assert s("torchrun --nproc_per_node 8 -m looplm train RECIPE.yaml")[1:6] == [
        "--nproc_per_node", "2", "-m", "looplm", "train"]
    with pytest.raises(AssertionError, match="does not know"):
        s("looplm serve --port 1")

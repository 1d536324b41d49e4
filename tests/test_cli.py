"""The command line as a new user meets it (issue 12): bad input fails at once with one `error:` line
naming the bad value, before any model is loaded; --threads, --version, --stream, a prompt on stdin;
a .gguf is converted once; a looplm dir loads without transformers' warnings."""

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

import looplm
from conftest import byte_tokenizer, tiny_model
from looplm import checkpoint
from looplm.__main__ import _read_prompts, app

COMPUTE_COMMANDS = [["generate"], ["calibrate"], ["analyze"], ["train"], ["demo"], ["eval"], ["retrofit", "search"]]


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_line_error(res, *names):
    """rc 2, stderr is a single `error:` line that names each of `names`."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for name in names:
        assert name in lines[0]
    return lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if any command gets as far as loading a model or running a demo or eval."""
    from looplm import demo
    from looplm.evaluation import runner

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(checkpoint, "load", boom)
    monkeypatch.setattr(demo, "run_demo", boom)
    monkeypatch.setattr(runner, "evaluate", boom)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny looplm dir without an exit gate, with a byte-level tokenizer (no chat template)."""
    path = tmp_path_factory.mktemp("cli") / "tiny"
    looplm.save(tiny_model(vocab_size=257, max_position_embeddings=256), path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mc.jsonl"
    rows = [{"question": f"Which {i}?", "choices": ["red", "green"], "answer_index": i % 2} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- fail fast, one line


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval", "--task", "arc-easy"],
                                     ["calibrate", "--text", __file__]])
def test_an_unknown_device_is_one_line_before_any_work(command, nothing_loads, tmp_path):
    res = run(*command, "--device", "tpu")
    one_line_error(res, "--device", "'tpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_before_any_work(device, nothing_loads):
    res = run("generate", "--prompt", "hi", "--device", device)
    one_line_error(res, f"'{device}'", "CUDA", "--device cpu")


def test_demo_out_a_file_fails_before_the_demo_runs(tmp_path, nothing_loads):
    (tmp_path / "notes.txt").write_text("mine")
    one_line_error(run("demo", "--out", tmp_path / "notes.txt", "--problems", "1"), str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_eval_out_a_file_fails_before_the_eval_runs(tmp_path, nothing_loads):
    (tmp_path / "notes.txt").write_text("mine")
    res = run("eval", "--task", "arc-easy", "--limit", "2", "--out", tmp_path / "notes.txt")
    one_line_error(res, str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, names", [
    (["--kv", "per_loop,lastt"], ["'lastt'"]),
    (["--exit", "q:2"], ["q:2"]),
    (["--loops", "1,0"], ["--loops", "'1,0'"]),
])
def test_eval_bad_sweep_values_fail_before_loading(args, names, mc_file, tmp_path, nothing_loads):
    res = run("eval", "--task", f"mc:{mc_file}", "--out", tmp_path / "out", *args)
    one_line_error(res, *names)


def test_eval_checks_the_whole_sweep_before_the_first_run(model_dir, mc_file, tmp_path, monkeypatch):
    """The README's failure: --exit q:... on a model without an exit gate was found after the static runs."""
    from looplm.evaluation import runner

    ran = []
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: ran.append(a) or pytest.fail("a run started"))
    res = run("eval", "--task", f"mc:{mc_file}", "--model", model_dir, "--loops", "1,2", "--exit", "conv:0.1,q:0.3",
              "--kv", "per_loop,last", "--out", tmp_path / "out")
    one_line_error(res, "q:0.3", "exit gate")
    assert not ran and not list((tmp_path / "out").rglob("*.json"))


def test_eval_runs_a_valid_sweep(model_dir, mc_file, tmp_path):
    res = run("eval", "--task", f"mc:{mc_file}", "--model", model_dir, "--loops", "1,2", "--exit", "conv:0.1",
              "--kv", "per_loop,last", "--out", tmp_path / "out", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*/*.json"))) == 6  # (2 static + 1 exit) × 2 kv


def test_eval_refusal_takes_no_exit_policy(nothing_loads, tmp_path):
    one_line_error(run("eval", "--task", "refusal", "--exit", "q:0.5", "--out", tmp_path / "o"), "--exit", "refusal")


# --------------------------------------------------------------------------- --threads, --version


@pytest.mark.parametrize("command", COMPUTE_COMMANDS, ids=" ".join)
def test_every_compute_command_has_threads_and_says_its_default(command):
    res = run(*command, "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.replace("│", " ").split())  # rich draws the help in boxes
    assert "--threads" in text and "torch's own, one per physical core" in text


def test_threads_sets_torch_threads(model_dir, restore_threads):
    torch.set_num_threads(2)
    res = run("generate", "--model", model_dir, "--prompt", "ab", "--max-new-tokens", "2", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("command", COMPUTE_COMMANDS, ids=" ".join)
def test_threads_below_one_is_one_line(command, nothing_loads):
    extra = {"train": ["x.yaml"], "calibrate": ["--text", __file__]}.get(command[0], [])
    one_line_error(run(*command, "--threads", "0", *extra), "--threads", "0")


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"looplm {looplm.__version__}"


# --------------------------------------------------------------------------- generate: stdin, --stream


def test_generate_reads_a_piped_prompt(model_dir):
    res = run("generate", "--model", model_dir, "--max-new-tokens", "3", "--json", input="12 + 3 =\n")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [c["prompt"] for c in report["completions"]] == ["12 + 3 ="]


def test_generate_without_a_prompt_says_so(model_dir, nothing_loads):
    one_line_error(run("generate", "--model", model_dir, input=""), "no prompt", "--prompt")
    one_line_error(run("generate", "--model", model_dir, input=" \n"), "no prompt")


def test_a_terminal_is_not_read_as_a_prompt(monkeypatch):
    import typer

    class Terminal:
        def isatty(self):
            return True

        def read(self):
            raise AssertionError("read a terminal")

    monkeypatch.setattr("sys.stdin", Terminal())
    with pytest.raises(typer.Exit):
        _read_prompts(None)
    assert _read_prompts(["given"]) == ["given"]


def test_stream_json_gives_a_line_per_token_then_the_report(model_dir):
    res = run("generate", "--model", model_dir, "--prompt", "ab", "--prompt", "cde", "--max-new-tokens", "5",
              "--json", "--stream", "--temperature", "1", "--seed", "3")
    assert res.exit_code == 0, res.output
    *events, last = [json.loads(line) for line in res.stdout.splitlines()]
    report = last
    for i, c in enumerate(report["completions"]):
        mine = [e for e in events if e["prompt"] == i]
        assert [e["token"] for e in mine if e["token"] is not None] == c["tokens"]
        assert "".join(e["text"] for e in mine) == c["text"]
        assert [e["loops"] for e in mine if e["token"] is not None] == c["loops_per_token"]


def test_stream_text_equals_no_stream_text(model_dir):
    args = ["generate", "--model", model_dir, "--prompt", "ab", "--max-new-tokens", "6"]
    streamed, whole = run(*args, "--stream"), run(*args, "--no-stream")
    assert streamed.exit_code == whole.exit_code == 0
    assert streamed.stdout == whole.stdout
    as_json = json.loads(run(*args, "--json").stdout)
    assert streamed.stdout == as_json["completions"][0]["text"] + "\n"


def test_stream_text_with_several_prompts_is_one_line(model_dir, nothing_loads):
    one_line_error(run("generate", "--model", model_dir, "--prompt", "a", "--prompt", "b", "--stream"), "--stream", "--json")


# --------------------------------------------------------------------------- GGUF cache, warnings


def test_a_gguf_is_converted_once_and_again_when_it_changes(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(src, out):  # a stand-in for transformers' dequantizing: an HF-style dir of the tiny model
        calls.append(src)
        checkpoint._write_dir_atomically(out, lambda tmp: [(tmp / p.name).write_bytes(p.read_bytes())
                                                           for p in model_dir.iterdir()])
        return out

    monkeypatch.setattr(checkpoint, "convert_gguf", convert)
    first = checkpoint.load(gguf)
    again = checkpoint.load(gguf)
    assert len(calls) == 1
    assert first.config.source["path"] == again.config.source["path"] == str(gguf)
    assert again.name_or_path == str(checkpoint.gguf_cache_dir(gguf))
    assert checkpoint.load_tokenizer(gguf)("ab")["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    res = run("generate", "--model", gguf, "--prompt", "ab", "--max-new-tokens", "2")
    assert res.exit_code == 0 and len(calls) == 1, res.output
    gguf.write_bytes(b"GGUF stand-in, changed")  # another size (and mtime): converted again
    checkpoint.load(gguf)
    assert len(calls) == 2


@pytest.mark.integration
def test_generate_from_the_real_gguf_converts_once(smollm2_dir, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    package, name = checkpoint.DEFAULT_GGUF
    gguf = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0]) / name
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    args = ["generate", "--model", gguf, "--prompt", "Hi", "--max-new-tokens", "2", "--json"]
    first = run(*args)
    assert first.exit_code == 0, first.output

    def no_convert(*a, **k):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(checkpoint, "convert_gguf", no_convert)
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["completions"] == json.loads(first.stdout)["completions"]


def test_a_looplm_dir_loads_without_transformers_warnings(model_dir):
    import transformers

    import looplm.hf  # noqa: F401 (registers)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = checkpoint.load_tokenizer(model_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok("ab")["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    assert isinstance(hf, looplm.LoopLMForCausalLM)

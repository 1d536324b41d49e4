"""Evaluation runs: scoring picks what an independent computation picks, resume, intervals, reports."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import byte_tokenizer, tiny_model
from looplm.__main__ import app
from looplm.evaluation import report, runner
from looplm.evaluation.tasks import Item, Task

TOK = byte_tokenizer()


def model():
    return tiny_model(vocab_size=257, max_position_embeddings=256, exit_gate=True)


def mc_task(n=6):
    items = [Item(id=f"q{i}", prompt=f"Question {i}: which?\nAnswer:", choices=[" red", " green", " blue", " no"],
                  answer=i % 4) for i in range(n)]
    return Task(name="toy-mc", kind="mc", items=items)


def loglik_by_hand(m, prompt, choice):
    ctx = TOK(prompt)["input_ids"]
    whole = TOK(prompt + choice)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([whole])).logits[0], -1)
    return sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


def test_multiple_choice_picks_the_highest_log_likelihood():
    m = model()
    task = mc_task()
    run = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-mc", loops=3), progress=False)
    for item, row in zip(task.items, run["items"]):
        lls = [loglik_by_hand(m, item.prompt, c) for c in item.choices]
        assert row["loglik"] == pytest.approx(lls, abs=1e-4)
        assert row["pred"] == max(range(4), key=lls.__getitem__)
        norm = [ll / len(c.removeprefix(" ")) for ll, c in zip(lls, item.choices)]  # lm-eval: len(choice)
        assert row["pred_norm"] == max(range(4), key=norm.__getitem__)
    acc = sum(r["pred"] == it.answer for r, it in zip(run["items"], task.items)) / len(task.items)
    assert run["metrics"]["accuracy"] == pytest.approx(acc)
    assert run["mean_loops"] == 3 and run["max_loops"] == 3


def test_exit_policy_and_kv_strategy_reach_the_scores():
    m = model()
    task = mc_task(4)
    static = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-mc", loops=4), progress=False)
    early = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-mc", loops=4, exit="q:0.3"), progress=False)
    shared = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-mc", loops=4, kv="last"), progress=False)
    assert early["mean_loops"] < 4 == static["mean_loops"]
    assert early["items"][0]["loglik"] != static["items"][0]["loglik"]
    assert shared["kv_bytes_per_token"] < static["kv_bytes_per_token"]


def test_interrupted_run_resumes_to_the_same_json(tmp_path):
    m = model()
    task = mc_task(7)
    cfg = runner.RunConfig("toy", "toy-mc", loops=2, kv="mean")
    full = runner.evaluate(m, TOK, task, cfg, cache_path=tmp_path / "a.jsonl", batch_size=2, progress=False)

    def crash(n):
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(m, TOK, task, cfg, cache_path=tmp_path / "b.jsonl", batch_size=2, progress=False, on_batch=crash)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4  # two batches landed
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"id": "q4", "trunc')  # a write torn by the crash
    resumed = runner.evaluate(m, TOK, task, cfg, cache_path=tmp_path / "b.jsonl", batch_size=2, progress=False)
    timing = ("wall_seconds", "seconds_per_item")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}


def test_generation_task_scores_extracted_answers():
    m = model()
    items = [Item(id="g0", prompt="2+2=", answer="4"), Item(id="g1", prompt="1+1=", answer="2")]

    class Exact(Task):
        def extract(self, completion):
            return completion.strip()

        def is_correct(self, item, completion):
            return self.extract(completion) == item.answer

    task = Exact(name="toy-gen", kind="gen", items=items, stop=["\n"], max_new_tokens=5)
    run = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-gen", loops=2), progress=False)
    for row in run["items"]:
        assert "\n" not in row["completion"] and row["correct"] == float(row["completion"].strip() == row["answer"])
        assert 1 <= row["tokens"] <= 5 and row["loops"] == 2


def test_perplexity_matches_a_forward_by_hand():
    m = model()
    text = "the cat sat on the mat. " * 3
    task = Task(name="toy-ppl", kind="ppl", items=[Item(id="d0", prompt=text)])
    run = runner.evaluate(m, TOK, task, runner.RunConfig("toy", "toy-ppl", loops=3), progress=False)
    ids = TOK(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids]), num_loops=3).logits[0], -1)
    nll = -sum(logp[p - 1, ids[p]].item() for p in range(1, len(ids)))
    assert run["items"][0]["nll"] == pytest.approx(nll, rel=1e-4)
    assert run["metrics"]["perplexity"] == pytest.approx(torch.tensor(nll / (len(ids) - 1)).exp().item(), rel=1e-4)


def test_bootstrap_interval_covers_the_truth():
    covered = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(1000 + seed)
        x = (torch.rand(300, generator=g) < 0.7).float().tolist()
        lo, hi = runner.bootstrap_ci(x, seed=seed, resamples=1000)
        covered += lo <= 0.7 <= hi
    assert 88 <= covered <= 100  # nominal 95%


def test_paired_difference_finds_real_effects_only():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(400, generator=g) < 0.5).float()
    better = torch.where(torch.rand(400, generator=g) < 0.3, torch.ones(400), a)
    assert runner.paired_difference(a.tolist(), better.tolist())["significant"]
    same = runner.paired_difference(a.tolist(), a.flip(0).tolist())
    assert not same["significant"] and same["p_value"] > 0.05


def test_too_long_prompts_are_refused():
    m = tiny_model(vocab_size=257, max_position_embeddings=16)
    with pytest.raises(ValueError, match="q0.*max_position_embeddings=16"):
        runner.evaluate(m, TOK, mc_task(1), runner.RunConfig("toy", "toy-mc"), progress=False)


def test_split_policies_and_sweep():
    assert runner.split_policies("q:0.3,q:0.6,min=2,conv:0.02") == ["q:0.3", "q:0.6,min=2", "conv:0.02"]
    cfgs = runner.sweep_configs("m", "t", loops=[1, 2, 4], exits=["q:0.5"], kvs=["per_loop", "last"])
    assert [(c.loops, c.exit, c.kv) for c in cfgs] == [
        (1, None, "per_loop"), (2, None, "per_loop"), (4, None, "per_loop"), (4, "q:0.5", "per_loop"),
        (1, None, "last"), (2, None, "last"), (4, None, "last"), (4, "q:0.5", "last")]


def test_report_and_compare(tmp_path):
    m = model()
    task = mc_task(8)
    cfgs = runner.sweep_configs("toy", "toy-mc", loops=[1, 3], exits=["q:0.5"], kvs=["per_loop", "last"])
    paths = runner.run_sweep(m, TOK, task, cfgs, tmp_path, progress=False)
    rep = report.write_report(paths, tmp_path)
    text = rep.read_text()
    assert text.count("| toy-mc |") == len(cfgs)
    assert {p.name for p in tmp_path.glob("*.png")} == {"metric_vs_loops.png", "frontier.png", "by_kv.png"}
    res = CliRunner().invoke(app, ["eval", "compare", str(paths[0]), str(paths[1]), "--json"])
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.stdout)
    assert cmp["difference_b_minus_a"]["n"] == 8
    bad = CliRunner().invoke(app, ["eval", "compare", str(paths[0]), str(tmp_path / "nope.json")])
    assert bad.exit_code == 2 and "nope.json" in bad.output


def test_resume_survives_two_crashes(tmp_path):
    m = model()
    task = mc_task(5)
    cfg = runner.RunConfig("toy", "toy-mc", loops=1)
    full = runner.evaluate(m, TOK, task, cfg, progress=False)
    path = tmp_path / "c.jsonl"
    runner.evaluate(m, TOK, mc_task(2), cfg, cache_path=path, progress=False)
    with open(path, "a") as f:
        f.write('{"id": "q2", "co')  # crash 1, mid-write
    runner.evaluate(m, TOK, mc_task(4), cfg, cache_path=path, progress=False)  # resumes, then "crashes" again
    again = runner.evaluate(m, TOK, task, cfg, cache_path=path, progress=False)
    assert [r["id"] for r in again["items"]] == [r["id"] for r in full["items"]]
    for a, b in zip(again["items"], full["items"]):  # other batch compositions: equal to float rounding
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4) and a["pred"] == b["pred"]


def test_empty_task_is_a_clear_error():
    with pytest.raises(ValueError, match="no items"):
        runner.evaluate(model(), TOK, mc_task(0), runner.RunConfig("toy", "toy-mc"), progress=False)


def test_core_and_dtype_separate_runs():
    a = runner.RunConfig("m", "t", loops=2, core="1:3")
    b = runner.RunConfig("m", "t", loops=2, core="2:4")
    assert a.key() != b.key() and a.filename() != b.filename()
    assert a.key() != runner.RunConfig("m", "t", loops=2, core="1:3", dtype="bfloat16").key()


def test_a_resumed_run_reports_the_time_its_items_took(tmp_path):
    """Issue 12: a run resumed from its cache reported `s/item 0.00` (only this session's time counted)."""
    m = model()
    task = mc_task(6)
    cfg = runner.RunConfig("toy", "toy-mc", loops=2)
    path = tmp_path / "t.jsonl"

    def crash(n):
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(m, TOK, task, cfg, cache_path=path, batch_size=2, progress=False, on_batch=crash)
    cached = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(cached) == 4 and all(r["seconds"] > 0 for r in cached)
    resumed = runner.evaluate(m, TOK, task, cfg, cache_path=path, batch_size=2, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert resumed["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    assert resumed["seconds_per_item"] == pytest.approx(resumed["wall_seconds"] / 6) and resumed["seconds_per_item"] > 0
    again = runner.evaluate(m, TOK, task, cfg, cache_path=path, batch_size=2, progress=False)  # all from the cache
    assert again["seconds_per_item"] == resumed["seconds_per_item"] > 0
    assert all("seconds" not in r for r in again["items"])  # the run's items stay what was scored


def test_a_sweep_is_checked_whole_before_its_first_run(tmp_path, monkeypatch):
    """Issue 12: the README's sweep failed at `--exit q:0.3` (no exit gate) after its static runs."""
    gateless = tiny_model(vocab_size=257, max_position_embeddings=256)
    configs = runner.sweep_configs("toy", "toy-mc", loops=[1, 2], exits=["conv:0.1", "q:0.3"], kvs=["per_loop", "last"])
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=r"loops=2 exit=q:0.3 kv=per_loop.*needs an exit gate"):
        runner.run_sweep(gateless, TOK, mc_task(2), configs, tmp_path)
    with pytest.raises(ValueError, match="min=3 > the 2 loops"):
        runner.check_sweep(gateless, TOK, mc_task(2), runner.sweep_configs("toy", "toy-mc", loops=[2], exits=["conv:0.1,min=3"], kvs=["last"]))
    with pytest.raises(ValueError, match="bogus"):
        runner.check_sweep(gateless, TOK, mc_task(2), [runner.RunConfig("toy", "toy-mc", loops=2, kv="bogus")])
    long = Task(name="toy-mc", kind="mc", items=[Item(id="x", prompt="y" * 300, choices=[" a"], answer=0)])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        runner.check_sweep(gateless, TOK, long, configs[:1])
    assert not list(tmp_path.iterdir())

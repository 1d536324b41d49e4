"""Scoring through lm-evaluation-harness: the "looplm" model against lm-eval's own `hf` backend, same weights, same run.

Both backends answer the same lm-eval `loglikelihood` requests, built by lm-eval from a task YAML over local data
(no downloads): each request is timed through `lm.loglikelihood(instances)`, the call lm-eval's evaluator makes
(tokenisation, sorting, batching and the forwards), at the same batch size and dtype. The backends alternate,
`--repeats` times each, after a warm-up; the table gives the median wall time and CPU time of this process and the
ratio looplm / hf (below 1: looplm is faster). Both must agree: per-request log-likelihoods to 1e-4, the greedy
flags, and lm-eval's own acc / acc_norm per item (`task.process_results`).

Tasks (`--tasks`, first `--items` items of each):
  arc_easy   ARC-Easy test through the shipped `arc_easy_local` YAML (lm-eval's arc_easy prompt): short choices
             (about 4 tokens), so contexts dominate
  mmlu_long  PIQA-style: MMLU test questions whose prompt is at most 40 tokens and whose choices average at least
             12 tokens, asked as cloze (`Question: ...\\nAnswer:` + " " + choice): continuations dominate, as in PIQA

    python benchmarks/scoring.py                                   # both tasks, 300 items each, fp32, batch 8
    python benchmarks/scoring.py --tasks arc_easy --items 100 --repeats 5 --dtype bfloat16

Prints a table, then one JSON line (machine, dtype, commit, config, figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: no dataset or model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import looplm  # noqa: E402
from looplm.evaluation import lm_eval_adapter  # noqa: E402  (registers the "looplm" model)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMLU_LONG_YAML = """task: mmlu_long
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


def write_mmlu_long(data: Path, out: Path, tokenizer, n: int) -> None:
    """The first n MMLU test items (subjects in file order) with a prompt ≤ 40 tokens and choices of ≥ 12 tokens
    on average, as JSONL, and their task YAML."""
    rows = []
    for path in sorted((data / "mmlu" / "test").glob("*_test.csv")):
        for k, (q, *choices, gold) in enumerate(csv.reader(path.open(newline=""))):
            prompt = len(tokenizer.encode(f"Question: {q}\nAnswer:"))
            cont = statistics.mean(len(tokenizer.encode(" " + c)) for c in choices)
            if prompt <= 40 and cont >= 12:
                rows.append({"id": f"{path.stem}/{k}", "question": q, "choices": choices,
                             "answer_index": "ABCD".index(gold.strip())})
        if len(rows) >= n:
            break
    (out / "mmlu_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    (out / "mmlu_long.yaml").write_text(MMLU_LONG_YAML.format(path=(out / "mmlu_long.jsonl").as_posix()))


def build(task_name: str, tm: TaskManager, items: int):
    task = tm.load([task_name])["tasks"][task_name]
    task.build_all_requests(limit=items, rank=0, world_size=1)
    return task, sorted(task.instances, key=lambda r: (r.doc_id, r.idx))


def timed(lm, instances) -> tuple[float, float, list]:
    t, c = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return time.perf_counter() - t, time.process_time() - c, out


def metrics(task, instances, results) -> list[dict]:
    """lm-eval's per-item acc / acc_norm from the responses."""
    by_doc: dict[int, list] = {}
    for inst, res in zip(instances, results):
        by_doc.setdefault(inst.doc_id, [inst.doc, []])[1].append(res)
    return [task.process_results(doc, resps) for doc, resps in by_doc.values()]


def run_task(name: str, task, instances, lms: dict, repeats: int) -> dict:
    for lm in lms.values():  # warm-up: first-call allocations, oneDNN kernel choice
        lm.loglikelihood(instances[:8], disable_tqdm=True)
    wall = {k: [] for k in lms}
    cpu = {k: [] for k in lms}
    results = {}
    for rep in range(repeats):  # alternating, so drift on this shared machine hits both alike
        for k, lm in lms.items():
            w, c, results[k] = timed(lm, instances)
            wall[k].append(w)
            cpu[k].append(c)
            print(f"  {name} repeat {rep + 1}/{repeats} {k}: {w:.1f} s wall, {c:.1f} s cpu", file=sys.stderr, flush=True)
    hf = results["hf"]
    m_hf = metrics(task, instances, hf)
    docs = len(m_hf)
    fig = {"task": name, "items": docs, "requests": len(instances),
           "continuation_tokens": sum(len(lms["hf"].tok_encode(i.args[1], add_special_tokens=False)) for i in instances)}
    for k in lms:
        m = metrics(task, instances, results[k])
        fig[k] = {"wall_s": wall[k], "cpu_s": cpu[k], "median_wall_s": statistics.median(wall[k]),
                  "median_cpu_s": statistics.median(cpu[k]),
                  "acc": sum(x["acc"] for x in m) / docs, "acc_norm": sum(x["acc_norm"] for x in m) / docs}
        if k != "hf":  # the same answers as hf: per request and per item
            fig[k].update(
                max_abs_ll_diff=max(abs(x[0] - y[0]) for x, y in zip(results[k], hf)),
                greedy_equal=sum(x[1] == y[1] for x, y in zip(results[k], hf)),
                acc_equal=sum(x["acc"] == y["acc"] for x, y in zip(m, m_hf)),
                acc_norm_equal=sum(x["acc_norm"] == y["acc_norm"] for x, y in zip(m, m_hf)),
                ratio_wall=fig[k]["median_wall_s"] / statistics.median(wall["hf"]),
                ratio_cpu=fig[k]["median_cpu_s"] / statistics.median(cpu["hf"]),
                ratio_wall_per_repeat=[x / y for x, y in zip(wall[k], wall["hf"])])
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="converted HF dir (default: SmolLM2-135M-Instruct, looplm.default_model_dir())")
    ap.add_argument("--data-dir", default=str(DATA), help="the project's shared/data")
    ap.add_argument("--tasks", default="arc_easy,mmlu_long")
    ap.add_argument("--items", type=int, default=300, help="multiple-choice items per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--score-path", action="store_true",
                    help="also time the looplm model through looplm.score (its path with exits or kv != per_loop, and "
                         "its static path before the packed forward) as backend looplm_score")
    args = ap.parse_args()

    path = args.model or str(looplm.default_model_dir())
    data = Path(args.data_dir)
    if not (data / "arc" / "ARC-Easy.test.jsonl").is_file():
        sys.exit(f"ARC-Easy not found under {data}: pass --data-dir (the project's shared/data)")
    where = Path(tempfile.mkdtemp(prefix="looplm-scoring-"))
    lm_eval_adapter.write_local_tasks(data, where)
    if "mmlu_long" in args.tasks:
        write_mmlu_long(data, where, looplm.load_tokenizer(path), args.items)
    tm = TaskManager(include_path=str(where), include_defaults=False)
    names = {"arc_easy": "arc_easy_local", "mmlu_long": "mmlu_long"}
    kw = {"batch_size": args.batch_size, "device": "cpu"}
    lms = {"looplm": get_model("looplm").create_from_arg_string(f"pretrained={path},dtype={args.dtype}", kw),
           "hf": get_model("hf").create_from_arg_string(f"pretrained={path},dtype={args.dtype}", kw)}
    if args.score_path:
        lms["looplm_score"] = get_model("looplm").create_from_arg_string(f"pretrained={path},dtype={args.dtype}", kw)
        lms["looplm_score"]._packed = False
    figures = []
    for name in args.tasks.split(","):
        task, instances = build(names[name], tm, args.items)
        figures.append(run_task(name, task, instances, lms, args.repeats))

    print(f"\nlm-eval loglikelihood, {path}, {args.dtype} on cpu ({torch.get_num_threads()} threads), batch "
          f"{args.batch_size}, median of {args.repeats} alternating repeats; ratio = looplm / hf (< 1: looplm faster)")
    head = (f"{'task':<10} {'items':>5} {'requests':>8} {'backend':<12} {'wall s':>7} {'cpu s':>7} {'ratio wall':>10} "
            f"{'ratio cpu':>9} {'acc':>6} {'acc_norm':>8} {'max |Δll|':>9} {'acc, acc_norm, greedy equal':>27}")
    print(head)
    print("-" * len(head))
    for f in figures:
        for k in lms:
            r, hf = f[k], f["hf"]
            same = "" if k == "hf" else f"{r['acc_equal']}, {r['acc_norm_equal']}, {r['greedy_equal']}"
            print(f"{f['task']:<10} {f['items']:>5} {f['requests']:>8} {k:<12} {r['median_wall_s']:>7.1f} "
                  f"{r['median_cpu_s']:>7.1f} {r['median_wall_s'] / hf['median_wall_s']:>10.2f} "
                  f"{r['median_cpu_s'] / hf['median_cpu_s']:>9.2f} {r['acc']:>6.3f} {r['acc_norm']:>8.3f} "
                  f"{r.get('max_abs_ll_diff', 0.0):>9.1e} {same:>27}")
    try:
        here = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--", "src/looplm/evaluation/lm_eval_adapter.py",
                           "benchmarks/scoring.py"],
                          capture_output=True, text=True, cwd=here).stdout.strip():
            commit += "+dirty"  # what ran is not exactly that commit
    except OSError:
        commit = None
    print(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                  "threads": torch.get_num_threads(),
                                  "load_avg_end": os.getloadavg()},
                      "dtype": args.dtype, "commit": commit, "config": {**vars(args), "model": path},
                      "figures": figures}))


if __name__ == "__main__":
    main()

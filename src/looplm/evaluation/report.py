"""Reports over run JSONs: a markdown table and PNG plots (accuracy vs loops, the compute/quality
frontier of each exit policy, accuracy by KV strategy), and paired comparisons of two runs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..plotting import dodge, integer_ticks, layered
from .runner import paired_difference


def load_run(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run file {str(path)!r} does not exist")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a run JSON ({e})") from None
    if "metrics" not in run or "items" not in run:
        raise ValueError(f"{path}: not a looplm eval run (no 'metrics'/'items')")
    return run


def _score(run: dict) -> float:
    m = run["metrics"]
    return m["accuracy"] if run["main_metric"] == "accuracy" else m["perplexity"]


def _ci(run: dict) -> tuple[float, float]:
    m = run["metrics"]
    return tuple(m["ci95"] if run["main_metric"] == "accuracy" else m["ci95_perplexity"])


def table(runs: list[dict]) -> str:
    """Markdown table, one row per run."""
    metric = runs[0]["main_metric"] if runs else "accuracy"
    head = f"| task | loops | exit | kv | {metric} | 95% CI | mean loops | KV B/token | s/item | n |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in runs:
        c = r["config"]
        lo, hi = _ci(r)
        fmt = "{:.3f}" if metric == "accuracy" else "{:.2f}"
        rows.append(
            f"| {r['task']['name']} | {r['max_loops']} | {c['exit'] or 'static'} | {c['kv']} | {fmt.format(_score(r))} "
            f"| [{fmt.format(lo)}, {fmt.format(hi)}] | {r['mean_loops']:.2f} | {r['kv_bytes_per_token']:,} "
            f"| {r['seconds_per_item']:.2f} | {r['task']['n_items']} |")
    return head + "\n".join(rows) + "\n"


def plots(runs: list[dict], out_dir: Path, *, prefix: str = "") -> list[Path]:
    """PNG files: metric vs loops (static, per KV), metric vs mean loops (per exit policy family), by KV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = runs[0]["main_metric"]
    task = runs[0]["task"]["name"]
    paths = []

    def finish(fig, ax, name, xlabel):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {name.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    static = [r for r in runs if not r["config"]["exit"]]
    if static:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_kv = defaultdict(list)
        for r in static:
            by_kv[r["config"]["kv"]].append(r)
        for k, (kv, rs) in enumerate(sorted(by_kv.items())):
            rs.sort(key=lambda r: r["max_loops"])
            xs = [r["max_loops"] + dodge(k, len(by_kv)) for r in rs]  # equal scores stay apart (issue 12)
            style = layered(k, len(by_kv))
            ax.errorbar(xs, [_score(r) for r in rs], yerr=_yerr(rs), capsize=3, elinewidth=style["linewidth"] / 2,
                        label=f"kv={kv}", **style)
        integer_ticks(ax.xaxis)
        finish(fig, ax, "metric_vs_loops", "loops (static)")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    families = defaultdict(list)
    for r in runs:
        exit = r["config"]["exit"]
        family = "static" if not exit else exit.split(":")[0]
        families[(family, r["config"]["kv"])].append(r)
    for k, ((family, kv), rs) in enumerate(sorted(families.items())):
        rs.sort(key=lambda r: r["mean_loops"])
        style = layered(k, len(families))  # a policy at the same point as a static run stays visible
        ax.errorbar([r["mean_loops"] for r in rs], [_score(r) for r in rs], yerr=_yerr(rs), capsize=3,
                    elinewidth=style["linewidth"] / 2, label=f"{family} (kv={kv})", **style)
    integer_ticks(ax.xaxis)
    finish(fig, ax, "frontier", "mean loops per token")

    kvs = sorted({r["config"]["kv"] for r in runs})
    if len(kvs) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        budgets = sorted({(r["max_loops"], r["config"]["exit"] or "static") for r in runs}, key=str)
        width = 0.8 / len(kvs)
        for k, kv in enumerate(kvs):
            vals = []
            for b in budgets:
                match = [r for r in runs if (r["max_loops"], r["config"]["exit"] or "static") == b and r["config"]["kv"] == kv]
                vals.append(_score(match[0]) if match else float("nan"))
            ax.bar([i + k * width for i in range(len(budgets))], vals, width, label=f"kv={kv}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))])
        ax.set_xticklabels([f"R={b[0]}\n{b[1]}" for b in budgets], fontsize=7)
        finish(fig, ax, "by_kv", "budget")
    return paths


def _yerr(rs: list[dict]) -> list[list[float]]:
    return [[_score(r) - _ci(r)[0] for r in rs], [_ci(r)[1] - _score(r) for r in rs]]


def write_report(paths: list[Path], out_dir: Path) -> Path:
    """report.md with the table and the plots of every run JSON in `paths` (one task per call)."""
    runs = [load_run(p) for p in paths]
    pngs = plots(runs, out_dir)
    text = f"# {runs[0]['task']['name']}\n\n" + table(runs) + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    report = out_dir / "report.md"
    report.write_text(text)
    return report


def compare(path_a: str | Path, path_b: str | Path) -> dict:
    """Paired bootstrap over the items both runs scored: is B's difference from A significant?"""
    a, b = load_run(path_a), load_run(path_b)
    if a["task"]["name"] != b["task"]["name"]:
        raise ValueError(f"runs are on different tasks: {a['task']['name']!r} vs {b['task']['name']!r}")
    key = "correct" if a["main_metric"] == "accuracy" else "nll"
    ia, ib = {r["id"]: r for r in a["items"]}, {r["id"]: r for r in b["items"]}
    common = [i for i in ia if i in ib]
    if not common:
        raise ValueError("the two runs share no items")
    if key == "nll":  # per-token NLL per document; lower is better
        va = [ia[i]["nll"] / max(1, ia[i]["tokens"]) for i in common]
        vb = [ib[i]["nll"] / max(1, ib[i]["tokens"]) for i in common]
    else:
        va, vb = [ia[i][key] for i in common], [ib[i][key] for i in common]
    diff = paired_difference(va, vb)
    return {"task": a["task"]["name"], "metric": "accuracy" if key == "correct" else "nll_per_token",
            "a": {"file": str(path_a), "label": _label(a), "mean": sum(va) / len(va), "mean_loops": a["mean_loops"]},
            "b": {"file": str(path_b), "label": _label(b), "mean": sum(vb) / len(vb), "mean_loops": b["mean_loops"]},
            "difference_b_minus_a": diff}


def _label(run: dict) -> str:
    c = run["config"]
    return f"loops={run['max_loops']} exit={c['exit'] or 'static'} kv={c['kv']}"

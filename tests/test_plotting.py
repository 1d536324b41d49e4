"""Every figure puts loop counts on whole-number ticks, keeps coinciding series visible and shows the values
it plots (issue 12). Figures are caught as they are saved and their axes read back."""

import pytest
import torch

pytest.importorskip("matplotlib")

from looplm import analysis, plotting
from looplm.demo import DemoResult
from looplm.demo import plot as demo_plot
from looplm.evaluation import refusal, report
from looplm.retrofit_search import Candidate, Ranked, SearchResult, heatmap


@pytest.fixture
def saved(monkeypatch):
    """The figures saved during the test, still open for inspection."""
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def visible_ticks(axis) -> list[float]:
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def assert_integer_ticks(axis):
    ticks = visible_ticks(axis)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def assert_distinct_and_layered(lines):
    """Each series has its own marker/line style; the first is drawn widest, so a later one never hides it."""
    assert len({(ln.get_marker(), ln.get_linestyle()) for ln in lines}) == len(lines)
    sizes = [ln.get_markersize() for ln in lines]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_layered_and_dodge():
    styles = [plotting.layered(k, 6) for k in range(6)]
    assert len({(s["marker"], s["linestyle"]) for s in styles}) == 6
    assert [s["zorder"] for s in styles] == sorted(s["zorder"] for s in styles)
    assert plotting.dodge(0, 1) == 0 and plotting.dodge(0, 2) == -plotting.dodge(1, 2)


def _run(loops, mean_loops, exit, kv, acc):
    return {"main_metric": "accuracy", "task": {"name": "toy"}, "config": {"exit": exit, "kv": kv},
            "metrics": {"accuracy": acc, "ci95": [acc - 0.1, acc + 0.1]}, "max_loops": loops, "mean_loops": mean_loops}


def test_report_plots(saved, tmp_path):
    # two KV strategies with the same accuracy at loops 1 and 2 (the case that drew 1.0, 1.5, 2.0 ticks)
    runs = [_run(r, r, None, kv, 0.5) for r in (1, 2) for kv in ("last", "per_loop")]
    runs.append(_run(2, 1.4, "q:0.5", "per_loop", 0.5))
    assert [p.name for p in report.plots(runs, tmp_path)] == ["metric_vs_loops.png", "frontier.png", "by_kv.png"]
    by_loops, frontier = saved[0].axes[0], saved[1].axes[0]
    for ax in (by_loops, frontier):
        assert_integer_ticks(ax.xaxis)
    lines = [c.lines[0] for c in by_loops.containers]  # each error bar's data line
    assert_distinct_and_layered(lines)
    assert tuple(lines[0].get_xdata()) != tuple(lines[1].get_xdata())  # equal points dodge apart, bars too
    assert_distinct_and_layered([c.lines[0] for c in frontier.containers])


def test_refusal_plot_shows_the_whole_rate_range(saved, tmp_path):
    rates = [{"kv": "per_loop", "loops": r, "refusal_harmful": 0.0, "refusal_benign": 0.0} for r in (1, 2)]
    result = {"refusal": rates, "probe_accuracy_by_loop": [0.3, 0.9]}
    refusal._plots(result, torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([1, 0] * 4), tmp_path)
    rates, probe = saved[0].axes
    lo, hi = rates.get_ylim()
    assert lo < 0 and hi >= 1  # a refusal rate of 0 is on the plot, not below it
    assert probe.get_ylim()[0] <= 0.3  # a probe below the old 0.4 floor is shown
    for ax in (rates, probe):
        assert_integer_ticks(ax.xaxis)
    assert_distinct_and_layered(rates.get_lines())


def test_demo_plot_keeps_lines_at_100_percent_visible(saved, tmp_path):
    res = DemoResult(model="m", task="chain", difficulties=[1, 2, 3], loops=[1, 2, 3, 4], problems_per_difficulty=5,
                     accuracy={"1": [1.0, 1.0, 1.0, 1.0], "2": [0.0, 1.0, 1.0, 1.0], "3": [0.0, 0.0, 1.0, 1.0]},
                     exit_policy="q:0.6", exit_accuracy={"1": 1.0, "2": 1.0, "3": 0.9},
                     exit_mean_loops={"1": 1.5, "2": 2.5, "3": 3.5})
    demo_plot(res, tmp_path / "demo.png")
    acc = saved[0].axes[0]
    assert_integer_ticks(acc.xaxis)
    assert_distinct_and_layered(acc.get_lines())
    lo, hi = acc.get_ylim()
    assert lo < 0 and hi > 100  # markers at 0% and 100% are drawn whole


def test_analysis_plot_and_heatmap_ticks(saved, tmp_path):
    diags = [analysis.LoopDiagnostics(core=(i, i + 1), loops=2, tokens=4, rel_change=[0.5, 0.2], cosine=[0.9, 0.95],
                                      entropy=[2.0, 2.5], layer_rel_change=[], layer_entropy=[]) for i in (0, 1)]
    analysis.plot(diags, tmp_path / "a.png")
    for ax in saved[0].axes:
        assert_integer_ticks(ax.xaxis)
        assert_distinct_and_layered(ax.get_lines())
    delta = {"mean": 0.1, "ci95": [0.0, 0.2], "p_value": 0.5, "n": 4, "significant": False}
    ranked = [Ranked(Candidate(i, j, 2), 0.5, 1.0, delta, delta) for i, j in ((0, 1), (0, 2), (1, 3))]
    res = SearchResult("toy", "acc", 3, 4, 0, 0.5, 1.0, ranked, 0.0, 0.0, len(ranked))
    heatmap(res, tmp_path / "h.png")
    ax = saved[1].axes[0]
    assert_integer_ticks(ax.xaxis) and assert_integer_ticks(ax.yaxis)

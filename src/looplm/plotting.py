"""What every looplm figure shares (issue 12): loop counts on whole-number ticks, and series that coincide
(several difficulties all at 100%, two KV strategies with the same accuracy) still visible.

Pure helpers over matplotlib axes; matplotlib itself is imported by the plotting functions that call them.
"""

from __future__ import annotations

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def integer_ticks(*axes) -> None:
    """Ticks only at whole numbers on each axis (`ax.xaxis`, `ax.yaxis`): loops and layers are counts."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def layered(k: int, n: int) -> dict:
    """Line kwargs for series k of n that may lie on top of each other: each has its own marker and line
    style, and earlier series are drawn wider and with larger markers beneath later ones, so where they
    coincide every one shows as a ring or band around the next."""
    depth = (n - 1 - k) / max(1, n - 1)  # 1 for the first (bottom) series, 0 for the last (top)
    return dict(marker=MARKERS[k % len(MARKERS)], linestyle=LINESTYLES[k % len(LINESTYLES)],
                markersize=5 + 6 * depth, linewidth=1.3 + 2.2 * depth, zorder=2 + k)


def dodge(k: int, n: int, width: float = 0.12) -> float:
    """x offset of series k of n spread over `width` (centred on 0), for error bars at the same x."""
    return 0.0 if n < 2 else width * (k / (n - 1) - 0.5)

"""The comparison figure: val loss of every curve over steps, and the runs' LR schedules underneath."""

from __future__ import annotations

from pathlib import Path

from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

Curve = dict[int, "float | None"]  # step -> value (None: not finite)


def _xy(curve: Curve) -> tuple[list[int], list[float]]:
    points = [(s, v) for s, v in sorted(curve.items()) if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_comparison(path: Path, title: str, long: dict[str, Curve], short: dict[str, Curve],
                    lr: dict[str, Curve], target: float | None) -> None:
    """`long`: the long run's curves, raw first then its averages; `short`: one val-loss curve per short run;
    `lr`: the LR per step of the long run (first) and of each short run, under the same labels as `short`."""
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)  # rendered by Agg, without pyplot's global figure state
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    colors = iter(rcParams["axes.prop_cycle"].by_key()["color"])
    short_colors = {}
    for i, (label, curve) in enumerate(long.items()):
        ax.plot(*_xy(curve), label=label, color="black" if i == 0 else next(colors),
                lw=1.8 if i == 0 else 1.5, marker=".", ms=4)
    for label, curve in short.items():
        short_colors[label] = next(colors)
        steps, values = _xy(curve)
        ax.plot(steps, values, label=label, color=short_colors[label], ls="--", lw=1.3)
        if steps:
            ax.plot(steps[-1:], values[-1:], color=short_colors[label], marker="o", ms=6)
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:.4f}")
    # Log scale keeps the early losses and the small late differences on one axis; a loss spans less than a
    # decade or two, so plain evenly spaced tick values read better than powers of ten.
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=10))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("val loss (nats/token, log scale)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)

    for i, (label, curve) in enumerate(lr.items()):
        ax_lr.plot(*_xy(curve), label=label, color="black" if i == 0 else short_colors.get(label),
                   ls="-" if i == 0 else "--", lw=1.3)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(True, alpha=0.3)
    ax_lr.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=120)

"""Training curves as a PNG (matplotlib, Agg backend: no display needed).

    write_curves_png("run/curves.png", {
        "reward/mean": {"rpg": [(step, mean, low, high), ...], "grpo": [...]},
        "kl/k3": {"rpg": [(step, value), ...]},
    })

One axis per metric, stacked in the order given, with every series of that metric overlaid on
the same scale, a legend, labelled axes, and a shaded band where a point carries (low, high).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Point = tuple[float, ...]  # (step, value) or (step, value, low, high)


def write_curves_png(
    path: str | Path,
    panels: Mapping[str, Mapping[str, Sequence[Point]]],
    title: str = "",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = {metric: series for metric, series in panels.items() if any(series.values())}
    fig, axes = plt.subplots(
        max(len(shown), 1), 1, figsize=(7, 2.4 * max(len(shown), 1)), sharex=True, squeeze=False
    )
    for ax, (metric, series) in zip(axes[:, 0], shown.items(), strict=False):
        for label, points in series.items():
            if not points:
                continue
            columns = list(zip(*points, strict=True))
            (line,) = ax.plot(columns[0], columns[1], label=label, linewidth=1.4)
            if len(columns) == 4:
                ax.fill_between(
                    columns[0],
                    columns[2],
                    columns[3],
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7, ncol=min(len(series), 4))
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

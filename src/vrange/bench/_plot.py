"""``python -m vrange bench --plot DIR``: one chart per group of rows (matplotlib, the optional
``[plot]`` extra): each row's median ratio with its p10-p90 spread, the parity line at 1 and the
row's target where it has one."""

from __future__ import annotations

import os
from typing import Any

from ._rows import GROUPS
from ._runner import BenchRun

PLOT_EXTRA_HINT = "pip install 'vrange[plot]' (or pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    pass


def _pyplot() -> Any:
    try:
        import matplotlib  # type: ignore[import-not-found]
    except ImportError as error:
        raise PlotUnavailable(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot  # type: ignore[import-not-found]

    return pyplot


def plot(bench: BenchRun, directory: str) -> list[str]:
    """Write ``<group>.png`` into ``directory`` for every group with measured rows; their paths."""
    pyplot = _pyplot()
    os.makedirs(directory, exist_ok=True)
    written = []
    groups: dict[str, list[Any]] = {}
    for result in bench.results:
        if result.samples:
            groups.setdefault(result.row.group, []).append(result)
    for group, results in groups.items():
        names = [result.row.name.split("/", 1)[1] for result in results]
        summaries = [result.summary for result in results]
        medians = [summary.median for summary in summaries]
        low = [summary.median - summary.p10 for summary in summaries]
        high = [summary.p90 - summary.median for summary in summaries]
        figure, axes = pyplot.subplots(figsize=(9, 1.2 + 0.28 * len(results)))
        positions = list(range(len(results)))[::-1]
        colours = ["tab:red" if result.row.target and not result.row.target.met(summary.median)
                   else "tab:orange" if summary.wide else "tab:blue"
                   for result, summary in zip(results, summaries)]
        axes.barh(positions, medians, xerr=[low, high], color=colours, capsize=2)
        for position, result in zip(positions, results):
            if result.row.target is not None:
                axes.plot([result.row.target.limit] * 2, [position - 0.4, position + 0.4],
                          color="black", linewidth=1.5)
        axes.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        axes.set_yticks(positions)
        axes.set_yticklabels(names, fontsize=7)
        axes.set_xlabel("measured / baseline (median, p10-p90; black tick: target; "
                        "red: target missed, orange: wide spread)", fontsize=8)
        axes.set_title(GROUPS.get(group, group), fontsize=10)
        if max(medians) / max(min(medians), 1e-9) > 30:
            axes.set_xscale("log")
        figure.tight_layout()
        path = os.path.join(directory, f"{group}.png")
        figure.savefig(path, dpi=110)
        pyplot.close(figure)
        written.append(path)
    return written

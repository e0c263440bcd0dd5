"""PNG plots (matplotlib, Agg backend: no display, no pyplot global state; `pip install transformers_red[plot]`)."""

from __future__ import annotations

import os
from typing import Any


def new_figure(figsize: tuple[float, float] = (7, 4.2), dpi: int = 110):
    """A matplotlib Figure on an Agg canvas; a clear ImportError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('Plotting needs matplotlib: pip install "transformers_red[plot]" (or matplotlib).') from err
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> str | os.PathLike:
    """tight_layout, then write `path` (format by suffix); returns `path`."""
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_demo(report: dict[str, Any], output_dir: str) -> list[str]:
    """accuracy_per_hop.png, erank_per_layer.png, projection_spectra.png; returns their paths."""
    teacher, students = report["teacher"], report["students"]
    labels = ["teacher"] + [f"{s['name']} s{s['seed']}" for s in students]
    runs = [teacher] + students
    paths = []

    fig = new_figure()
    ax = fig.add_subplot()
    for label, run in zip(labels, runs):
        hops = [int(h) for h in run["accuracy"]]
        ax.plot(hops, [100 * a for a in run["accuracy"].values()], marker="o", label=label)
    ax.set(xlabel="hops (composition steps)", ylabel="exact match (%)", ylim=(-2, 102),
           title="Held-out accuracy per hop count")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(output_dir, "accuracy_per_hop.png")))

    fig = new_figure()
    ax = fig.add_subplot()
    for label, run in zip(labels, runs):
        ax.plot(range(len(run["erank"])), run["erank"], marker=".", label=label)
    ax.set(xlabel="hidden state (0 = embedding output)", ylabel="effective rank", title="eRank per layer")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(output_dir, "erank_per_layer.png")))

    fig = new_figure()
    ax = fig.add_subplot()
    for student in students:
        for when, style in (("spectrum_init", "--"), ("spectrum_end", "-")):
            values = student[when]["example"]
            ax.plot(range(len(values)), values, style,
                    label=f"{student['name']} s{student['seed']} ({'init' if when == 'spectrum_init' else 'end'})")
    ax.set(xlabel="index", ylabel="singular value", title="Spectrum of one projection (embedding) at init and end")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, os.path.join(output_dir, "projection_spectra.png")))
    return paths

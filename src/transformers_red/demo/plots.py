"""The demo's three plots (accuracy per hop, eRank per layer, projection spectra at init and end)."""

from __future__ import annotations

import os
from typing import Any

from ..plots import new_figure, save_figure


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

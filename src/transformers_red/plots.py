"""PNG plots (matplotlib, Agg backend: no display, no pyplot global state; `pip install transformers_red[plot]`)."""

from __future__ import annotations

import os


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

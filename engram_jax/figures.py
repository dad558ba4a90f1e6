"""Matplotlib on the file-only Agg backend, and saving a figure: shared by every plot."""

from __future__ import annotations

import pathlib


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path, dpi: int = 110) -> None:
    """Lays out, writes and closes a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)

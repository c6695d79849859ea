"""The probes' figures, drawn only when matplotlib is installed (an optional dependency: the tests never need it).

Each function returns the path it wrote, or None when matplotlib is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib  # imported here: optional and slow to import

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    curves: dict[str, list[float]], path: str | Path, xlabel: str, ylabel: str, title: str,
    xs: list[float] | None = None, logy: bool = False, vline: float | None = None,
) -> Path | None:
    """One line per entry of `curves` (same x axis: `xs`, default 0..n-1) in a PNG at `path`."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(xs if xs is not None else range(len(ys)), ys, marker="." if len(ys) < 60 else None, label=name)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle=":", linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The lab's figures: matplotlib on its file-only backend, and one way to write a figure out."""
from __future__ import annotations

from pathlib import Path


def subplots(*args, **kwargs):
    """``(fig, axes)`` as ``pyplot.subplots`` gives them, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path, *, dpi=None) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its folder made; ``dpi`` None: the figure's own), close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

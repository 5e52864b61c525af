"""A PNG of three orthogonal slices with the mask (and the label, when given) drawn over the scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import HeartsegError


def require_pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise HeartsegError("overlays need matplotlib: pip install matplotlib, or pip install -e '.[viz]' in heartseg's source folder") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_overlay(path: Path, image: np.ndarray, mask: np.ndarray, label: np.ndarray | None, title: str) -> Path:
    """Sagittal, coronal and axial slices (RAS arrays) through the target's centre: prediction red, label green."""
    plt = require_pyplot()
    ref = label if label is not None and label.any() else mask
    centre = np.argwhere(ref).mean(axis=0).astype(int) if ref.any() else np.asarray(image.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    try:
        _draw(fig, axes, image, mask, label, centre, title)
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _draw(fig, axes, image: np.ndarray, mask: np.ndarray, label: np.ndarray | None, centre: np.ndarray,
          title: str) -> None:
    for axis, ax in enumerate(axes):
        index: list = [slice(None)] * 3
        index[axis] = int(centre[axis])
        ax.imshow(np.rot90(image[tuple(index)]), cmap="gray")
        if label is not None and label[tuple(index)].any():
            ax.contour(np.rot90(label[tuple(index)]), levels=[0.5], colors="lime", linewidths=1)
        if mask[tuple(index)].any():
            ax.contour(np.rot90(mask[tuple(index)]), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(("sagittal", "coronal", "axial")[axis] + f" slice {index[axis]}")
        ax.axis("off")
    fig.suptitle(title + ("   red: prediction, green: label" if label is not None else "   red: prediction"))
    fig.tight_layout()

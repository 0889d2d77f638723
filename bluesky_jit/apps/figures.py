"""Pictures: slices side by side and learning curves, as PNG files.

matplotlib is imported inside the functions, and figures are drawn off-screen
(no pyplot), so nothing here needs a screen or changes the backend.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def save_slices(
    path: str | Path,
    images: Mapping[str, np.ndarray],
    *,
    title: str = "",
    window: tuple[float, float] | None = None,
    maps: Collection[str] = (),
) -> Path:
    """Save images (each (H, W)) side by side with one shared grey window.

    The window defaults to the 1st and 99th percentile of the first image, so
    noisy and denoised slices are drawn on the same scale. The images named
    in ``maps`` (e.g. an uncertainty map and the error) share a colour scale
    of their own, from 0 to the 99th percentile of the first of them, with a
    colour bar.
    """
    from matplotlib.figure import Figure

    items = [(k, np.asarray(v)) for k, v in images.items() if v is not None]
    slices = [image for name, image in items if name not in maps]
    if window is None:
        lo, hi = np.percentile(slices[0], [1, 99])
        window = (float(lo), float(hi))
    coloured = [image for name, image in items if name in maps]
    top = float(np.percentile(coloured[0], 99)) if coloured else 1.0
    fig = Figure(figsize=(3.2 * len(items), 3.4))
    axes = fig.subplots(1, len(items), squeeze=False)
    for ax, (name, image) in zip(axes[0], items, strict=True):
        if name in maps:
            shown = ax.imshow(image, cmap="magma", vmin=0.0, vmax=top or 1.0)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="1/mm")
        else:
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1])
        ax.set_title(name)
        ax.axis("off")
    return _save(fig, path, title)


def save_learning_curve(
    path: str | Path, metrics: Sequence[Mapping[str, Any]], *, title: str = ""
) -> Path:
    """Training loss and hold-out accuracy alpha against optimizer steps.

    alpha is drawn with the reference levels of Graas et al. 2023 (eq. 3): 1 means no
    denoising, about 0.5 an ideal Noise2Noise denoiser.
    """
    from matplotlib.figure import Figure

    steps = [m["step"] for m in metrics]
    loss = [m.get("loss", math.nan) for m in metrics]
    alpha = [m.get("alpha", math.nan) for m in metrics]
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, loss, marker=".")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss (normalised)")
    ax1.set_yscale("log")
    ax2.plot(steps, alpha, marker=".", color="tab:red")
    ax2.axhline(1.0, color="grey", ls="--", lw=0.8, label="no denoising")
    ax2.axhline(0.5, color="grey", ls=":", lw=0.8, label="ideal (Noise2Noise)")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("hold-out accuracy alpha")
    ax2.legend(loc="upper right", fontsize=8)
    return _save(fig, path, title)


def _save(fig: Any, path: str | Path, title: str) -> Path:
    """Title, lay out and write a figure (creating the folder)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

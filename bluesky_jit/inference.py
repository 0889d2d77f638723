"""Inference with the newest weights: the denoiser shown next to each slice.

A :class:`Denoiser` owns its own copy of the network. Before each image it
asks its source (a :class:`~bluesky_jit.training.Trainer`) for the weight
version and copies the weights in only when they are newer, so inference
never waits for a training step (seed 000, Fig. 3: component (3) "loads theta
from memory" while component (6) keeps updating it).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, ScanDataError
from .models.checkpoint import load_checkpoint
from .training import Normalizer, WeightsSnapshot


class WeightSource(Protocol):
    """What a :class:`Denoiser` needs from a trainer."""

    def snapshot(self) -> WeightsSnapshot: ...


class Denoiser:
    """Denoise full slices with the newest weights of a trainer or a checkpoint.

    Parameters
    ----------
    model : torch.nn.Module or callable returning one
        The architecture. A module is deep-copied, so the trainer's own
        network (trained in place in another thread) is never run here.
    source : WeightSource, optional
        Usually the :class:`~bluesky_jit.training.Trainer`; its newest weights
        and normaliser are used at every call.
    normalizer : Normalizer, optional
        Fixed normalisation when there is no source (e.g. from a checkpoint).
    device : str or torch.device
    pad_multiple : int, optional
        Images are reflect-padded to a multiple of this and cropped back; by
        default the model's ``size_multiple`` (2**levels for the U-Net).
    channels_last : bool, optional
        Keep the weights in channels-last memory format. By default on the CPU
        only, where oneDNN convolutions ran the U-Net about twice as fast on a
        1024x1024 slice (2 cores); untested on CUDA, hence off there.

    Notes
    -----
    Until the source has a normaliser (no training step yet and no warm
    start), images are returned unchanged: an untrained network is not shown.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        *,
        source: WeightSource | None = None,
        normalizer: Normalizer | None = None,
        device: str | torch.device = "cpu",
        pad_multiple: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        elif callable(model):
            model = model()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"Denoiser needs a torch.nn.Module or a callable returning one; got "
                f"{type(model).__name__}."
            )
        self.device = torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format).eval()
        self.source = source
        self.normalizer = normalizer
        multiple = pad_multiple if pad_multiple is not None else getattr(model, "size_multiple", 1)
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ConfigError(
                f"Denoiser pad_multiple must be a positive integer; got {multiple!r}."
            )
        self.pad_multiple = multiple
        self.weights_version: int | None = None
        """Version of the weights used by the last call (the trainer's step count)."""
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        expected_name: str | None = None,
    ) -> Denoiser:
        """A stand-alone denoiser with the weights and normaliser of a checkpoint.

        Raises
        ------
        CheckpointError
            If the checkpoint cannot be loaded or has no normaliser.
        """
        model, extra = load_checkpoint(path, expected_name=expected_name, map_location=device)
        try:
            normalizer = Normalizer.from_dict(extra["normalizer"])
        except (KeyError, ConfigError) as exc:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} has no usable extra['normalizer'] ({exc}); expected "
                "one written by Trainer.save() after at least one training step."
            ) from exc
        denoiser = cls(model, normalizer=normalizer, device=device)
        step = extra.get("step")
        denoiser.weights_version = step if isinstance(step, int) else None
        return denoiser

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Denoise one slice.

        Parameters
        ----------
        image : ndarray, shape (H, W) or (C, H, W)
            (H, W) for single-channel networks.

        Returns
        -------
        ndarray, shape (H, W) or (C_out, H, W), float32
        """
        x = np.asarray(image, dtype=np.float32)
        if x.ndim not in (2, 3) or min(x.shape) < 1:
            raise ScanDataError(
                f"Denoiser got an image of shape {x.shape}; expected (H, W) or (C, H, W)."
            )
        squeeze = x.ndim == 2
        with self._lock:
            self._refresh()
            norm = self.normalizer
            if norm is None:
                return x.copy()
            t = torch.from_numpy(x if x.flags.writeable else x.copy()).to(self.device)
            t = t[None, None] if squeeze else t[None]
            height, width = t.shape[-2:]
            t, (top, left) = _pad(norm(t), self.pad_multiple)
            with torch.inference_mode():
                out = self.model(t)
            out = norm.inverse(out[..., top : top + height, left : left + width])
        out = out[0, 0] if squeeze and out.shape[1] == 1 else out[0]
        return out.to("cpu", torch.float32).numpy()

    def _refresh(self) -> None:
        if self.source is None:
            return
        version, state, normalizer = self.source.snapshot()
        if version != self.weights_version:
            self.model.load_state_dict(state)
            self.weights_version = version
        self.normalizer = normalizer


def _pad(t: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) symmetrically to multiples of ``multiple``; return the offsets."""
    height, width = t.shape[-2:]
    ph, pw = -height % multiple, -width % multiple
    if ph == 0 and pw == 0:
        return t, (0, 0)
    top, left = ph // 2, pw // 2
    pads = (left, pw - left, top, ph - top)
    # reflect needs the pad to be smaller than the image; tiny images replicate instead
    mode = (
        "reflect" if max(top, ph - top) < height and max(left, pw - left) < width else "replicate"
    )
    return F.pad(t, pads, mode=mode), (top, left)

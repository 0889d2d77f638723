"""Inference with the newest weights: the denoiser shown next to each slice.

A :class:`Denoiser` owns its own copy of the network. Before each image it
asks its source (a :class:`~bluesky_jit.training.Trainer`) for the weight
version and copies the weights in only when they are newer, so inference
never waits for a training step (Graas et al. 2023, Fig. 3: component (3) "loads theta
from memory" while component (6) keeps updating it).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int
from .errors import CheckpointError, ConfigError, ScanDataError
from .models.checkpoint import load_checkpoint
from .training import (
    Normalizer,
    WeightsSnapshot,
    _turn,
    _undo,
    memory_format_for,
    resolve_precision,
)


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
    infer_precision : {"float32", "bfloat16", "auto"}
        ``"auto"``: :func:`~bluesky_jit.training.resolve_precision` for
        ``device``. ``"bfloat16"`` keeps a bfloat16 copy of the weights and runs the
        network in bfloat16 (input and output are float32). On a CPU with
        AVX512-BF16 this ran the Standard U-Net on a 1024x1024 slice 2.4-2.7x
        faster (2 cores: about 120 ms against 300 ms); the rounding (relative
        2**-8) is far below the noise it removes (``benchmarks/learning.py``
        reports PSNR in both precisions: equal within 0.02 dB).
    num_threads : int, optional
        Intra-op threads for inference, set in the calling thread (OpenMP
        settings are per thread, so the trainer's thread keeps its own). On a
        2-core machine shared with other work, 1 thread was steadier than 2
        (2 threads stall when the other core is busy); ``None`` keeps torch's
        setting. The live pipeline passes its CPU budget's ``infer_threads``
        (:class:`~bluesky_jit.budget.CpuBudget`).
    self_ensemble : bool
        Average the network over the 8 turns and mirror images of the input
        (geometric self-ensemble; 8x the time). Fits networks trained with
        ``Trainer(augment=True)``; for small slices or offline results.

    Notes
    -----
    Until the source has a normaliser (no training step yet and no warm
    start), images are returned unchanged: an untrained network is not shown.

    Networks on stacks (``spatial_dims == 3``, e.g. ``unet3d``) take an image
    of shape (frames, H, W) and return the middle frame (H, W).
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
        infer_precision: str = "float32",
        num_threads: int | None = None,
        self_ensemble: bool = False,
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
        check_int("Denoiser", "num_threads", num_threads, none=True)
        self.num_threads = num_threads
        self.self_ensemble = bool(self_ensemble)
        self.device = torch.device(device)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.precision = precision = resolve_precision(infer_precision, self.device)
        self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.memory_format = memory_format_for(model, channels_last)
        self.spatial_dims = int(getattr(model, "spatial_dims", 2))
        self.frames = int(getattr(model, "frames", 1))
        self.model = model.to(self.device, self.dtype, memory_format=self.memory_format).eval()
        self.source = source
        self.normalizer = normalizer
        multiple = pad_multiple if pad_multiple is not None else getattr(model, "size_multiple", 1)
        check_int("Denoiser", "pad_multiple", multiple)
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
        **kwargs: Any,
    ) -> Denoiser:
        """A stand-alone denoiser with the weights and normaliser of a checkpoint.

        ``kwargs`` are further :class:`Denoiser` settings (e.g. ``infer_precision``).

        Raises
        ------
        CheckpointError
            If the checkpoint cannot be loaded or has no normaliser.
        """
        model, extra = load_checkpoint(path, expected_name=expected_name, map_location=device)
        try:
            normalizer = Normalizer.from_dict(extra["normalizer"])
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} has no usable extra['normalizer'] ({exc}); expected "
                "one written by Trainer.save() after at least one training step."
            ) from exc
        denoiser = cls(model, normalizer=normalizer, device=device, **kwargs)
        step = extra.get("step")
        denoiser.weights_version = step if isinstance(step, int) else None
        return denoiser

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Denoise one slice.

        Parameters
        ----------
        image : ndarray, shape (H, W) or (C, H, W)
            (H, W) for single-channel networks; (frames, H, W) for networks
            on stacks (``spatial_dims == 3``), or (C, frames, H, W).

        Returns
        -------
        ndarray, shape (H, W) or (C_out, H, W), float32
            Without an untrained network's normaliser: the image unchanged
            (for a stack, its middle frame).
        """
        x = np.asarray(image, dtype=np.float32)
        stack = self.spatial_dims == 3
        if stack:
            if x.ndim == 3:
                x = x[None]
            ok = x.ndim == 4 and x.shape[1] == self.frames and min(x.shape) >= 1
            expected = f"({self.frames}, H, W) or (C, {self.frames}, H, W)"
        else:
            ok = x.ndim in (2, 3) and min(x.shape) >= 1
            expected = "(H, W) or (C, H, W)"
        if not ok:
            raise ScanDataError(
                f"Denoiser got an image of shape {np.shape(image)}; expected {expected}."
            )
        squeeze = np.ndim(image) == (3 if stack else 2)
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)  # this thread only
        with self._lock:
            self._refresh()
            norm = self.normalizer
            if norm is None:
                out_np = x[:, self.frames // 2] if stack else x
                return (out_np[0] if squeeze and out_np.shape[0] == 1 else out_np).copy()
            ok = x.flags.writeable and x.flags.c_contiguous  # views with negative strides too
            t = torch.from_numpy(x if ok else np.array(x, order="C")).to(self.device)
            t = t[None] if stack or not squeeze else t[None, None]
            height, width = t.shape[-2:]
            t, (top, left) = _pad(norm(t), self.pad_multiple)
            t = t.to(self.dtype)
            with torch.inference_mode():
                if self.self_ensemble:
                    out = self._run(t)
                    for k in range(1, 8):
                        out += _undo(self._run(_turn(t, k)), k)
                    out /= 8
                else:
                    out = self._run(t)
            out = norm.inverse(out[..., top : top + height, left : left + width])
        out = out[:, :, 0] if stack else out
        out = out[0, 0] if squeeze and out.shape[1] == 1 else out[0]
        return out.to("cpu", torch.float32).numpy()

    def _run(self, t: torch.Tensor) -> torch.Tensor:
        return self.model(t.contiguous(memory_format=self.memory_format)).float()

    def denoise_mean(self, inputs: np.ndarray) -> np.ndarray:
        """Mean of the denoised images of several inputs: the Noise2Inverse estimate.

        Parameters
        ----------
        inputs : ndarray, shape (K, H, W) or, for stacks, (K, frames, H, W)
            E.g. :meth:`bluesky_jit.pairs.PairMaker.inference_inputs` (X:1:
            mean of the other K - 1 splits; 1:X: each split). For K = 2 and
            even/odd halves this is ``(A(even) + A(odd)) / 2``.

        Returns
        -------
        ndarray, shape (H, W), float32
        """
        return self.denoise_each(inputs).mean(axis=0)

    def denoise_each(self, inputs: np.ndarray) -> np.ndarray:
        """The denoised image of each input: their mean is :meth:`denoise_mean`, their
        spread the raw material of :func:`bluesky_jit.noise2inverse.uncertainty`.

        Parameters
        ----------
        inputs : ndarray, shape (K, H, W) or, for stacks, (K, frames, H, W)

        Returns
        -------
        ndarray, shape (K, H, W), float32
        """
        inputs = np.asarray(inputs, dtype=np.float32)
        if inputs.ndim != (4 if self.spatial_dims == 3 else 3) or inputs.shape[0] < 1:
            raise ScanDataError(
                f"denoise_mean() and denoise_each() got inputs of shape {inputs.shape}; expected "
                "(K, H, W), or (K, frames, H, W) for a network on stacks."
            )
        return np.stack([self(item) for item in inputs]).astype(np.float32, copy=False)

    def _refresh(self) -> None:
        if self.source is None:
            return
        version, state, normalizer = self.source.snapshot()
        if version != self.weights_version:
            self.model.load_state_dict(state)
            self.weights_version = version
        self.normalizer = normalizer


def _pad(t: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (..., H, W) symmetrically to multiples of ``multiple``; return the offsets."""
    if t.ndim != 4:  # reflect padding of H and W wants (N, C, H, W)
        padded, offsets = _pad(t.reshape(1, -1, *t.shape[-2:]), multiple)
        return padded.reshape(*t.shape[:-2], *padded.shape[-2:]), offsets
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

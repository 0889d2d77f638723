"""Choose a backprojection backend by name: the registry.

Names: ``"numba"`` (CPU default), ``"torch"`` (any torch device, the CUDA
path), ``"astra"`` (axial parallel-beam slices on the CPU; the numerical
reference), ``"cupy"`` (CUDA kernels), ``"auto"`` (numba on the CPU when
numba imports, torch otherwise). The contract every backend keeps, and how
closely they agree, is :class:`~.base.Backend`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Backend

BACKENDS = ("auto", "numba", "torch", "astra", "cupy")


def make_backend(name: str = "auto", *, device: Any = "cpu", threads: int | None = None) -> Backend:
    """A backend instance; see the module notes for the names."""
    import torch

    device = torch.device(device)
    if name not in BACKENDS:
        raise ConfigError(f"Unknown reconstruction backend {name!r}; expected one of {BACKENDS}.")
    if name == "auto":
        if device.type == "cpu":
            try:
                import numba  # noqa: F401
            except ImportError:
                name = "torch"
            else:
                name = "numba"
        else:
            name = "torch"
    if name in ("numba", "astra") and device.type != "cpu":
        raise ConfigError(
            f"backend={name!r} runs on the CPU but device={str(device)!r} was requested; use "
            "backend='torch' (or 'cupy') on a GPU."
        )
    if name == "numba":
        try:
            from .numba_backend import NumbaBackend
        except ImportError as error:
            raise ConfigError(
                "backend='numba' needs numba (pip install numba); or use backend='torch'."
            ) from error
        return NumbaBackend(threads=threads)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(device=device)
    if name == "astra":
        try:
            from .astra_backend import AstraBackend

            return AstraBackend()
        except ImportError as error:
            raise ConfigError(
                "backend='astra' needs astra-toolbox (pip install 'bluesky-jit[astra]')."
            ) from error
    if device.type != "cuda":  # name == "cupy"
        raise ConfigError(
            f"backend='cupy' runs on a CUDA device; got device={str(device)!r}. Use "
            "device='cuda' or backend='numba' on the CPU."
        )
    from .cupy_backend import CupyBackend

    return CupyBackend(device=device)

"""Slice reconstruction from buffered, filtered projections.

A slice (:class:`bluesky_jit.geometry.Slice`) or a batch of training patches
is a set of world points; a backend (:func:`make_backend`: ``numba`` on the
CPU, ``torch`` on any device, ``astra`` as the CPU reference, ``cupy`` on
CUDA) backprojects filtered projections there through the geometry's
projective matrices: parallel-beam FBP and cone-beam FDK at any position and
orientation. :mod:`.streaming` keeps the projections of a running scan,
:mod:`.sirt` runs windowed streaming SIRT (seed 001).

Scale: every backend returns attenuation coefficients in 1/unit of length
(1/mm) from projections filtered by :class:`bluesky_jit.projections.ProjectionFilter`;
ASTRA's own units are converted in :mod:`.astra_backend`.
"""

from .backends import BACKENDS, make_backend
from .grids import patch_grid, slice_grid
from .torch_backend import TorchBackend, TorchBackprojector

__all__ = [
    "BACKENDS",
    "TorchBackend",
    "TorchBackprojector",
    "make_backend",
    "patch_grid",
    "slice_grid",
]

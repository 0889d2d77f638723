"""Slice reconstruction from buffered, filtered projections.

A slice (:class:`bluesky_jit.geometry.Slice`) or a batch of training patches
is a set of world points; a backend (:class:`~.base.Backend`, made by
:func:`make_backend`: ``numba`` on the CPU, ``torch`` on any device, ``astra``
as the CPU reference, ``cupy`` on CUDA) backprojects filtered projections
there through the geometry's projective matrices: parallel-beam FBP and
cone-beam FDK at any position and orientation. :mod:`.streaming` keeps the
projections of a running scan, :mod:`.sirt` runs windowed streaming SIRT
(Liu et al. 2019).

Intensity scale conventions (every backend, every path)
-------------------------------------------------------
1. Frames are raw counts; :class:`~bluesky_jit.projections.FlatField` gives
   line integrals ``p = -log((I - dark) / (flat - dark))``, dimensionless.
2. Cone beam: ``p`` times the FDK pre-weight ``D / sqrt(D**2 + a**2 + b**2)``
   (1 on the central ray; :func:`~bluesky_jit.projections.fdk_weights`).
3. Ramp filter: ``q = (p * h) / pixel``, ``h`` the discrete Ram-Lak kernel in
   1/pixel**2 (optionally apodised), ``pixel`` the detector pixel at the
   rotation axis in mm (``pixel_size * source_origin / (source_origin +
   origin_detector)`` for cone beam): ``q`` is in 1/mm.
4. Backprojection: ``pi / n`` times the sum over the ``n`` projections given
   (:func:`~bluesky_jit.geometry.window_weight`), for 180 and 360 degree scans
   alike (a 360 degree scan sees every line twice over ``2 pi``); cone beam
   also weights each sample by ``1 / w**2`` (``w = 1`` on the rotation axis).
   Output: attenuation coefficients in 1/mm, unchanged by detector binning.
5. Subsets: each Noise2Inverse half (or ``j::K`` subset) is itself a full
   FBP/FDK with ``pi / n_j``, so halves and the full slice share one scale; the
   full slice is their mean weighted by ``n_j / n``.
6. ASTRA works in pixel units: its FBP returns attenuation per pixel
   (divided by the pixel size here), its BP the plain sum of projector
   weights (times ``pi / n``), and its image row 0 lies at +y (flipped
   here); see :mod:`.astra_backend`.
7. Streaming SIRT's forward projector ``A = (pixel_image**2 / pixel_detector)
   B^T`` maps images in 1/mm to dimensionless line integrals, the scale of
   step 1 (:mod:`.sirt`).
"""

from .backends import BACKENDS, make_backend
from .base import Backend
from .grids import patch_grid, slice_grid
from .torch_backend import TorchBackend, TorchBackprojector

__all__ = [
    "BACKENDS",
    "Backend",
    "TorchBackend",
    "TorchBackprojector",
    "make_backend",
    "patch_grid",
    "slice_grid",
]

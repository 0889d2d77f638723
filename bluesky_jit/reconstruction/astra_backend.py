"""ASTRA Toolbox: the numerical reference (2D CPU FBP) and a backend (2D CPU BP).

:func:`astra_fbp` is ASTRA's own CPU FBP (filter included), the reference in
tests and benchmarks. :class:`AstraBackend` backprojects this package's
filtered projections with ASTRA's CPU ``BP`` on a ``parallel_vec`` geometry,
for slices with a constant detector row. ASTRA's 3D and CUDA algorithms kill
the process without a GPU; this module never calls them unless
``astra.use_cuda()`` is true (and the 3D path is not implemented yet).

Scale and axes: ASTRA works in voxel units (detector pixel = voxel = 1), so
its FBP returns attenuation per pixel; dividing by ``pixel_size`` gives
attenuation per unit length, the scale of
:class:`~bluesky_jit.reconstruction.TorchBackprojector`. With the same angles,
ASTRA's volume row 0 lies at +y: its image is the vertical mirror of the
convention in :mod:`bluesky_jit.geometry`, and this module flips it back.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..geometry import window_weight
from .base import Backend, check_projections, offset_rows
from .plans import axial_lines, interpolate_rows

_FILTERS = {"ram-lak": "ram-lak", "shepp-logan": "shepp-logan", "cosine": "cosine", "hann": "hann"}


def astra_fbp(
    sinogram: np.ndarray,
    angles: np.ndarray,
    *,
    n: int,
    center_of_rotation: float,
    pixel_size: float = 1.0,
    filter_name: str = "ram-lak",
) -> np.ndarray:
    """Reconstruct one n x n slice with ASTRA's CPU FBP.

    ASTRA's CPU FBP takes only the plain ``parallel`` geometry, whose rotation
    axis is the detector centre. The sinogram is therefore zero-padded so that
    the centre of rotation becomes the centre; a centre that is not a whole or
    half pixel is first moved by a Fourier (sub-pixel) shift.

    Parameters
    ----------
    sinogram : ndarray, shape (n_angles, cols)
        Line integrals (not filtered).
    angles : ndarray, shape (n_angles,)
        Radians, in the convention of :mod:`bluesky_jit.geometry`.

    Returns
    -------
    ndarray, shape (n, n)
    """
    import astra

    sinogram, cols = centred(np.asarray(sinogram, dtype=np.float64), center_of_rotation)
    proj_geom = astra.create_proj_geom("parallel", 1.0, cols, np.asarray(angles, dtype=np.float64))
    vol_geom = astra.create_vol_geom(n, n)
    proj_id = astra.create_projector("linear", proj_geom, vol_geom)
    sinogram = sinogram.astype(np.float32)
    image = _run(astra, "FBP", proj_geom, vol_geom, proj_id, sinogram, _FILTERS[filter_name])
    return np.ascontiguousarray(np.flipud(image)) / pixel_size


def _run(astra, algorithm, proj_geom, vol_geom, proj_id, sino, filt=None) -> np.ndarray:
    """Run one ASTRA 2D algorithm (FBP, BP) on a sinogram and free what it made."""
    sino_id = astra.data2d.create("-sino", proj_geom, sino)
    rec_id = astra.data2d.create("-vol", vol_geom, 0.0)
    cfg = astra.astra_dict(algorithm)
    cfg["ProjectionDataId"] = sino_id
    cfg["ReconstructionDataId"] = rec_id
    cfg["ProjectorId"] = proj_id
    if filt is not None:
        cfg["FilterType"] = filt
    alg_id = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg_id)
        return astra.data2d.get(rec_id)
    finally:
        astra.algorithm.delete(alg_id)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(proj_id)


def centred(sinogram: np.ndarray, center_of_rotation: float) -> tuple[np.ndarray, int]:
    """Zero-pad (and sub-pixel shift) so the rotation axis is the detector centre."""
    cols = sinogram.shape[1]
    twice = 2 * center_of_rotation
    frac = twice - round(twice)
    if abs(frac) > 1e-6:  # move the axis to the nearest half pixel
        shift = frac / 2
        freq = np.fft.fftfreq(2 * cols)
        spec = np.fft.fft(sinogram, n=2 * cols, axis=1) * np.exp(2j * np.pi * freq * shift)
        sinogram = np.real(np.fft.ifft(spec, axis=1))[:, :cols]
        twice = round(twice)
    # centre index (width - 1) / 2 must equal cor + left
    left = max(0, cols - 1 - int(twice))
    width = int(twice) + 1 + 2 * left
    right = width - cols - left
    if right < 0:
        left, right = left - right, 0
        width = cols + left
    return np.pad(sinogram, ((0, 0), (left, right))), width


class AstraBackend(Backend):
    """ASTRA Toolbox as a backend: backprojection of our filtered projections.

    On the CPU ASTRA's 2D ``BP`` algorithm handles slices on which the detector
    row is constant (axial parallel-beam slices, any in-plane rotation, ROI and
    zoom) through a ``parallel_vec`` geometry. Everything else needs ASTRA's
    3D CUDA code and is used only when ``astra.use_cuda()`` is true (without a
    GPU those calls kill the process).

    Scale: ASTRA's BP is the plain sum over projections of the projector's
    weights; multiplied by ``pi / n`` it matches
    :class:`~bluesky_jit.reconstruction.numba_backend.NumbaBackend`.

    Parameters
    ----------
    projector : {"linear", "line", "strip", "distance_driven"}
        ASTRA CPU projector (``linear``, Joseph's interpolation, by default).
    """

    name = "astra"

    def __init__(self, *, projector: str = "linear") -> None:
        import astra

        self._astra = astra
        self.projector = projector

    def backproject(self, filtered, geometry, slice_, *, row_offset: int = 0) -> np.ndarray:
        data = filtered.detach().cpu().numpy() if hasattr(filtered, "detach") else filtered
        data = np.ascontiguousarray(data, dtype=np.float32)
        check_projections(data.shape, geometry, row_offset=row_offset)
        mats = offset_rows(geometry.matrices(), row_offset)
        lines = axial_lines(mats, slice_)
        if lines is None:
            reason = (
                "ASTRA's 3D CUDA path is not implemented in this version"
                if self._astra.use_cuda()
                else "that needs ASTRA's 3D CUDA code, and no GPU is available"
            )
            raise ConfigError(
                "ASTRA on the CPU reconstructs only slices with a constant detector row "
                f"(axial parallel-beam slices without tilt); {reason}. Use backend='numba' "
                "or backend='torch'."
            )
        q = interpolate_rows(data, lines.row)
        return _bp_2d(self._astra, q, lines, slice_.shape, self.projector) * np.float32(
            window_weight(len(geometry))
        )

    def backproject_grids(self, filtered, geometry, origins, like, *, row_offset: int = 0):
        """Not available: ASTRA backprojects whole slices here, not training patches."""
        raise ConfigError(
            "backend='astra' reconstructs whole axial slices, not training patches; use "
            "backend='numba' or backend='torch' for a pipeline that trains."
        )


def _bp_2d(astra, q: np.ndarray, lines, shape, projector: str) -> np.ndarray:
    """ASTRA 2D BP on our image grid: pixel (i, j) at (x, y) = (j - (cols-1)/2, i - (rows-1)/2)."""
    rows, cols = shape
    det = q.shape[1]
    c, s = lines.step_col, lines.step_row
    # detector column of pixel (x, y): cc + x c + y s
    cc = lines.b0 + (rows - 1) / 2 * s + (cols - 1) / 2 * c
    norm2 = c**2 + s**2
    u = np.stack([c, s], 1) / norm2[:, None]
    ray = np.stack([-s, c], 1) / np.sqrt(norm2)[:, None]
    centre = ((det - 1) / 2 - cc)[:, None] * u
    vectors = np.concatenate([ray, centre, u], 1)
    proj_geom = astra.create_proj_geom("parallel_vec", det, vectors)
    vol_geom = astra.create_vol_geom(rows, cols)
    proj_id = astra.create_projector(projector, proj_geom, vol_geom)
    # ASTRA's weights are path lengths in image pixels, i.e. scale with the image
    # pixel / detector pixel ratio; the detector pixel width |u| undoes that
    weighted = (q / np.sqrt(norm2)[:, None]).astype(np.float32)
    image = _run(astra, "BP", proj_geom, vol_geom, proj_id, weighted)
    return np.ascontiguousarray(np.flipud(image), dtype=np.float32)

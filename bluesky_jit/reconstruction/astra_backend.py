"""ASTRA Toolbox reference: 2D parallel-beam FBP on the CPU.

Used as the numerical reference in tests and benchmarks. ASTRA's 3D and
CUDA algorithms kill the process without a GPU, so only the 2D CPU ``FBP``
algorithm is used here unless ``astra.use_cuda()`` says otherwise.

Scale and axes: ASTRA works in voxel units (detector pixel = voxel = 1), so
its FBP returns attenuation per pixel; dividing by ``pixel_size`` gives
attenuation per unit length, the scale of
:class:`~bluesky_jit.reconstruction.TorchBackprojector`. With the same angles,
ASTRA's volume row 0 lies at +y: its image is the vertical mirror of the
convention in :mod:`bluesky_jit.geometry`, and this module flips it back.
"""

from __future__ import annotations

import numpy as np

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
    sino_id = astra.data2d.create("-sino", proj_geom, sinogram.astype(np.float32))
    rec_id = astra.data2d.create("-vol", vol_geom, 0.0)
    proj_id = astra.create_projector("linear", proj_geom, vol_geom)
    cfg = astra.astra_dict("FBP")
    cfg["ProjectionDataId"] = sino_id
    cfg["ReconstructionDataId"] = rec_id
    cfg["ProjectorId"] = proj_id
    cfg["FilterType"] = _FILTERS[filter_name]
    alg_id = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(alg_id)
        image = astra.data2d.get(rec_id)
    finally:
        astra.algorithm.delete(alg_id)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(proj_id)
    return np.ascontiguousarray(np.flipud(image)) / pixel_size


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

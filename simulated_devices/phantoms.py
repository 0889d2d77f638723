"""Analytic dynamic phantoms for parallel-beam tomography.

`BubbleColumn` is a glass column of liquid with a granular bed of small beads at
the bottom and gas bubbles rising through the liquid above it. Every part is a
sphere or an infinite cylinder, so projections are exact line integrals (chord
lengths) computed in closed form: no pixel-driven forward projector, hence no
inverse crime when the reconstruction code uses one.

Geometry convention (binding; the reconstruction code relies on it)
-------------------------------------------------------------------
Lengths are in mm, attenuation coefficients ``mu`` in 1/mm.

- The rotation axis is the line through detector column ``center_of_rotation``
  (default ``(cols - 1) / 2``), parallel to the detector columns. ``z`` runs
  along the detector rows: detector row ``r`` sits at
  ``z = (r - (rows - 1) / 2) * pixel_size``. Row 0 is the top: bubbles rise
  toward row 0 (decreasing ``z``); the bed lies at the last rows.
- A reconstructed slice ``img`` of shape ``(ny, nx)`` has
  ``x = (j - (nx - 1) / 2) * pixel_size`` for column ``j`` and
  ``y = (i - (ny - 1) / 2) * pixel_size`` for row ``i``, with ``(x, y) = (0, 0)``
  on the rotation axis.
- At stage angle ``theta`` (degrees) the point ``(x, y, z)`` projects to detector
  column ``center_of_rotation + (x * cos(theta) + y * sin(theta)) / pixel_size``
  and detector row ``z / pixel_size + (rows - 1) / 2``.

Hence ``truth(t, row).sum(axis=0) * pixel_size`` is the projection row at
``theta = 0`` and ``truth(t, row).sum(axis=1) * pixel_size`` the one at 90 deg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bluesky_jit.errors import ConfigError, GeometryError

__all__ = ["BubbleColumn", "sphere_chord"]

_PHANTOM_TYPE = "BubbleColumn"
_DESCRIPTION_VERSION = 1


def sphere_chord(radius: float, offset: np.ndarray) -> np.ndarray:
    """Chord length of a ray through a sphere (or a disk).

    Parameters
    ----------
    radius : float
        Radius of the sphere, mm.
    offset : ndarray, any shape
        Distance of the ray from the centre, mm.

    Returns
    -------
    ndarray, same shape as `offset`
        ``2 * sqrt(radius**2 - offset**2)`` where the ray hits, else 0.
    """
    arg = radius * radius - np.asarray(offset, dtype=np.float64) ** 2
    return 2.0 * np.sqrt(np.maximum(arg, 0.0))


@dataclass(frozen=True)
class _Spheres:
    """Spheres sharing one box size, with their attenuation relative to the liquid.

    Attributes
    ----------
    x, y, z : ndarray, shape (S,)
        Centres, mm.
    radius : ndarray, shape (S,)
        Radii, mm.
    dmu : float
        Attenuation minus the liquid attenuation, 1/mm.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    radius: np.ndarray
    dmu: float


class BubbleColumn:
    """A bubble column over a granular bed: a dynamic analytic CT phantom.

    Parts (all centred on ``container_center``, the column axis parallel to z):

    - a glass wall, the annulus between ``container_radius - wall_thickness``
      and ``container_radius``, infinite in z;
    - liquid filling the inside;
    - a bed of non-overlapping beads (random sequential addition) filling the
      bottom ``bed_fraction`` of the detector height;
    - ``n_bubbles`` gas bubbles (attenuation 0) above the bed, rising at
      ``rise_speed`` along a helical wobble; a bubble that leaves the top of the
      field of view re-enters just above the bed. All bubbles share one rise
      speed, so they never overlap (checked at construction).

    Everything random comes from `seed`; the same arguments give the same
    phantom (see `describe` and `from_description`).

    Parameters
    ----------
    detector_shape : tuple of int
        ``(rows, cols)`` of the detector.
    pixel_size : float
        Detector pixel size, mm.
    center_of_rotation : float, optional
        Detector column of the rotation axis, px; default ``(cols - 1) / 2``.
    seed : int
        Seed of every random choice.
    container_radius : float, optional
        Outer radius of the glass wall, mm; default 90 % of the smaller distance
        from the axis to a detector edge, less the distance of `container_center`
        from the axis, so the column stays in the field of view. A larger column
        sticks out of it (local tomography).
    wall_thickness : float, optional
        mm; default 8 % of `container_radius`.
    container_center : tuple of float
        ``(x, y)`` of the column axis, mm.
    max_attenuation : float
        Largest line integral through wall and liquid (no beads, no bubbles);
        sets the liquid attenuation. The bed adds about 20 %.
    wall_contrast, bead_contrast : float
        Attenuation of glass and of the beads relative to the liquid.
    n_bubbles : int
        Number of bubbles.
    bubble_radius : tuple of float, optional
        ``(min, max)`` bubble radius, mm; default 5 % and 10 % of the inner radius.
    rise_speed : float, optional
        mm/s, toward row 0; default 3 % of the detector height per second (about one
        bubble radius per 6 s, so a slice from one rotation at 15 frames/s is
        recognisable but visibly changes from rotation to rotation).
    wobble_amplitude : float, optional
        Radius of the helical wobble, mm; default 30 % of the smallest bubble radius.
    wobble_frequency : float
        Mean wobble frequency, Hz (each bubble gets 0.5x to 1.5x of it).
    bed_fraction : float
        Fraction of the detector height covered by the bed, 0 for no bed.
    bead_radius : float, optional
        mm; default 3 % of the inner radius.
    bed_packing : float
        Target volume fraction of beads in the bed (random sequential addition
        stops below about 0.35).

    Examples
    --------
    >>> col = BubbleColumn(detector_shape=(16, 128), seed=1)
    >>> col.project(30.0, 0.5).shape
    (16, 128)
    >>> col.truth(0.5, 8).shape
    (128, 128)
    """

    def __init__(
        self,
        *,
        detector_shape: tuple[int, int] = (16, 128),
        pixel_size: float = 1.0,
        center_of_rotation: float | None = None,
        seed: int = 0,
        container_radius: float | None = None,
        wall_thickness: float | None = None,
        container_center: tuple[float, float] = (0.0, 0.0),
        max_attenuation: float = 1.7,
        wall_contrast: float = 2.0,
        bead_contrast: float = 2.5,
        n_bubbles: int = 16,
        bubble_radius: tuple[float, float] | None = None,
        rise_speed: float | None = None,
        wobble_amplitude: float | None = None,
        wobble_frequency: float = 0.2,
        bed_fraction: float = 0.25,
        bead_radius: float | None = None,
        bed_packing: float = 0.25,
    ) -> None:
        rows, cols = _check_shape(detector_shape, "detector_shape")
        if not pixel_size > 0:
            raise ConfigError(f"pixel_size must be > 0 mm; got {pixel_size!r}.")
        cor = (cols - 1) / 2 if center_of_rotation is None else float(center_of_rotation)
        if not 0.0 <= cor <= cols - 1:
            raise GeometryError(
                f"center_of_rotation must lie on the detector, in [0, {cols - 1}] px; "
                f"got {cor}. Pass a column index or None for the centre."
            )
        fov_radius = (min(cor, cols - 1 - cor) + 0.5) * pixel_size
        offset = math.hypot(*(float(c) for c in container_center))
        if container_radius is None:
            r_out = 0.9 * fov_radius - offset
            if r_out <= 0:
                raise ConfigError(
                    f"container_center {tuple(container_center)} mm lies outside the field of "
                    f"view (radius {fov_radius:.3g} mm); move it closer to (0, 0)."
                )
        else:
            r_out = float(container_radius)
        wall = 0.08 * r_out if wall_thickness is None else float(wall_thickness)
        if not 0 < wall < r_out:
            raise ConfigError(
                f"wall_thickness must be in (0, container_radius={r_out}) mm; got {wall}."
            )
        r_in = r_out - wall
        b_min, b_max = (0.05 * r_in, 0.10 * r_in) if bubble_radius is None else bubble_radius
        if not 0 < b_min <= b_max:
            raise ConfigError(
                f"bubble_radius must be (min, max) with 0 < min <= max; got {(b_min, b_max)}."
            )
        height = rows * pixel_size
        speed = 0.03 * height if rise_speed is None else float(rise_speed)
        wobble = 0.3 * b_min if wobble_amplitude is None else float(wobble_amplitude)
        bead_r = 0.03 * r_in if bead_radius is None else float(bead_radius)
        if not 0.0 <= bed_fraction < 1.0:
            raise ConfigError(f"bed_fraction must be in [0, 1); got {bed_fraction}.")
        if not 0.0 <= bed_packing <= 0.35:
            raise ConfigError(
                f"bed_packing must be in [0, 0.35] (random packing jams near 0.38); "
                f"got {bed_packing}."
            )
        if max_attenuation <= 0 or wall_contrast < 0 or bead_contrast < 0:
            raise ConfigError(
                "max_attenuation must be > 0 and wall_contrast, bead_contrast >= 0; got "
                f"{max_attenuation}, {wall_contrast}, {bead_contrast}."
            )
        if n_bubbles < 0:
            raise ConfigError(f"n_bubbles must be >= 0; got {n_bubbles}.")

        self.detector_shape = (rows, cols)
        self.pixel_size = float(pixel_size)
        self.center_of_rotation = cor
        self.seed = int(seed)
        self.container_radius = r_out
        self.wall_thickness = wall
        self.container_center = (float(container_center[0]), float(container_center[1]))
        self.max_attenuation = float(max_attenuation)
        self.wall_contrast = float(wall_contrast)
        self.bead_contrast = float(bead_contrast)
        self.n_bubbles = int(n_bubbles)
        self.bubble_radius = (float(b_min), float(b_max))
        self.rise_speed = speed
        self.wobble_amplitude = wobble
        self.wobble_frequency = float(wobble_frequency)
        self.bed_fraction = float(bed_fraction)
        self.bead_radius = bead_r
        self.bed_packing = float(bed_packing)

        self.mu_liquid = self.max_attenuation / self._peak_container_path(1.0)
        self.mu_wall = self.wall_contrast * self.mu_liquid
        self.mu_bead = self.bead_contrast * self.mu_liquid

        rng = np.random.default_rng(self.seed)
        z_top = -rows / 2 * pixel_size  # top edge of row 0
        z_bottom = rows / 2 * pixel_size  # bottom edge of the last row
        self._bed_top = z_bottom - self.bed_fraction * height
        self._beads = self._make_beads(rng, z_bottom) if bed_fraction > 0 else None
        # Bubbles live on a periodic track: spawn just above the bed, leave the
        # field of view at the top, and re-enter at the spawn point.
        self._z_spawn = self._bed_top - b_max
        self._track = self._z_spawn - (z_top - b_max)
        if self._track <= 2 * b_max:
            raise ConfigError(
                f"No room for bubbles of radius up to {b_max:.3g} mm above a bed covering "
                f"{bed_fraction:.0%} of a {height:.3g} mm high field of view. "
                "Lower bed_fraction or bubble_radius."
            )
        self._make_bubbles(rng)

    # ------------------------------------------------------------------ set-up
    @property
    def inner_radius(self) -> float:
        """Inner radius of the glass wall, mm."""
        return self.container_radius - self.wall_thickness

    @property
    def n_beads(self) -> int:
        """Number of beads actually placed in the bed."""
        return 0 if self._beads is None else int(self._beads.x.size)

    def _container_profile(self, s: np.ndarray, mu_liquid: float) -> np.ndarray:
        """Line integral through wall and liquid at distance `s` (mm) from the axis."""
        outer = sphere_chord(self.container_radius, s)
        inner = sphere_chord(self.inner_radius, s)
        return self.wall_contrast * mu_liquid * (outer - inner) + mu_liquid * inner

    def _peak_container_path(self, mu_liquid: float) -> float:
        s = np.concatenate(
            [np.linspace(0.0, self.container_radius, 4097), [self.inner_radius * (1 - 1e-12)]]
        )
        return float(self._container_profile(s, mu_liquid).max())

    def _make_beads(self, rng: np.random.Generator, z_bottom: float) -> _Spheres:
        r = self.bead_radius
        reach = self.inner_radius - r
        z_lo, z_hi = self._bed_top + r, z_bottom + r
        if reach <= 0 or z_hi <= z_lo:
            raise ConfigError(
                f"bead_radius={r:.3g} mm does not fit the bed; use a smaller bead_radius."
            )
        volume = math.pi * self.inner_radius**2 * (z_bottom - self._bed_top)
        target = int(self.bed_packing * volume / (4 / 3 * math.pi * r**3))
        centres = np.empty((target, 3))
        placed = 0
        min_d2 = (2 * r) ** 2
        for _ in range(30 * target + 100):
            if placed == target:
                break
            rho = reach * math.sqrt(rng.random())
            phi = 2 * math.pi * rng.random()
            cand = (rho * math.cos(phi), rho * math.sin(phi), z_lo + (z_hi - z_lo) * rng.random())
            if placed and (((centres[:placed] - cand) ** 2).sum(axis=1) < min_d2).any():
                continue
            centres[placed] = cand
            placed += 1
        cx, cy = self.container_center
        c = centres[:placed]
        return _Spheres(
            x=c[:, 0] + cx,
            y=c[:, 1] + cy,
            z=c[:, 2],
            radius=np.full(placed, r),
            dmu=self.mu_bead - self.mu_liquid,
        )

    def _make_bubbles(self, rng: np.random.Generator) -> None:
        n = self.n_bubbles
        b_min, b_max = self.bubble_radius
        amp = self.wobble_amplitude
        radii = np.empty(n)
        xy = np.empty((n, 2))
        phase0 = np.empty(n)
        for k in range(n):
            for _ in range(2000):
                r = rng.uniform(b_min, b_max)
                reach = self.inner_radius - r - amp
                if reach <= 0:
                    raise ConfigError(
                        f"Bubbles of radius {r:.3g} mm with wobble {amp:.3g} mm do not fit "
                        f"inside the column (inner radius {self.inner_radius:.3g} mm)."
                    )
                rho = reach * math.sqrt(rng.random())
                phi = 2 * math.pi * rng.random()
                p = rng.uniform(0.0, self._track)
                cand = np.array([rho * math.cos(phi), rho * math.sin(phi)])
                dz = np.abs(phase0[:k] - p)
                dz = np.minimum(dz, self._track - dz)
                d2 = ((xy[:k] - cand) ** 2).sum(axis=1) + dz**2
                if (d2 >= (radii[:k] + r + 2 * amp) ** 2).all():
                    radii[k], xy[k], phase0[k] = r, cand, p
                    break
            else:
                raise ConfigError(
                    f"Could not place {n} non-overlapping bubbles (placed {k}). "
                    "Lower n_bubbles or bubble_radius, or lower bed_fraction."
                )
        self._bub_r = radii
        self._bub_xy = xy + np.asarray(self.container_center)
        self._bub_phase0 = phase0
        self._bub_omega = 2 * math.pi * self.wobble_frequency * rng.uniform(0.5, 1.5, n)
        self._bub_wphase = rng.uniform(0.0, 2 * math.pi, n)

    # ------------------------------------------------------------------ state
    def bubbles(self, t: float) -> np.ndarray:
        """Bubble centres and radii at time `t`.

        Parameters
        ----------
        t : float
            Time, s.

        Returns
        -------
        ndarray, shape (n_bubbles, 4)
            Columns ``x, y, z, radius`` in mm.
        """
        t = float(t)
        z = self._z_spawn - np.mod(self._bub_phase0 + self.rise_speed * t, self._track)
        arg = self._bub_omega * t + self._bub_wphase
        x = self._bub_xy[:, 0] + self.wobble_amplitude * np.sin(arg)
        y = self._bub_xy[:, 1] + self.wobble_amplitude * np.cos(arg)
        return np.stack([x, y, z, self._bub_r], axis=1)

    def _sphere_groups(self, t: float) -> list[_Spheres]:
        groups = [] if self._beads is None else [self._beads]
        if self.n_bubbles:
            b = self.bubbles(t)
            groups.append(_Spheres(b[:, 0], b[:, 1], b[:, 2], b[:, 3], -self.mu_liquid))
        return groups

    def row_z(self, row: float) -> float:
        """Height ``z`` (mm) of detector row `row`."""
        return (row - (self.detector_shape[0] - 1) / 2) * self.pixel_size

    # ------------------------------------------------------------------ projections
    def project(self, angle_deg: float, t: float) -> np.ndarray:
        """Exact line integrals through the phantom.

        Parameters
        ----------
        angle_deg : float
            Stage angle, degrees.
        t : float
            Time, s.

        Returns
        -------
        ndarray, shape (rows, cols), float64
            ``p = integral of mu dl`` at each detector pixel centre
            (dimensionless; transmission is ``exp(-p)``).
        """
        rows, cols = self.detector_shape
        px = self.pixel_size
        th = math.radians(float(angle_deg))
        cos, sin = math.cos(th), math.sin(th)
        cx, cy = self.container_center
        s = (np.arange(cols) - self.center_of_rotation) * px - (cx * cos + cy * sin)
        out = np.empty((rows, cols))
        out[:] = self._container_profile(s, self.mu_liquid)
        flat = out.reshape(-1)
        for g in self._sphere_groups(t):
            if g.x.size == 0:
                continue
            u = self.center_of_rotation + (g.x * cos + g.y * sin) / px  # column, px
            v = g.z / px + (rows - 1) / 2  # row, px
            half = math.ceil(float(g.radius.max()) / px + 0.5)
            offs = np.arange(-half, half + 1)
            cc = np.rint(u)[:, None].astype(np.int64) + offs  # (S, B)
            rr = np.rint(v)[:, None].astype(np.int64) + offs  # (S, B)
            du2 = ((cc - u[:, None]) * px) ** 2
            dz2 = ((rr - v[:, None]) * px) ** 2
            arg = (g.radius**2)[:, None, None] - dz2[:, :, None] - du2[:, None, :]
            chord = 2.0 * np.sqrt(np.maximum(arg, 0.0))  # (S, B, B)
            ok = ((rr >= 0) & (rr < rows))[:, :, None] & ((cc >= 0) & (cc < cols))[:, None, :]
            ok &= chord > 0
            idx = (rr[:, :, None] * cols + cc[:, None, :])[ok]
            flat += g.dmu * np.bincount(idx, weights=chord[ok], minlength=rows * cols)
        return out

    def truth(
        self,
        t: float,
        row: int,
        shape: tuple[int, int] | None = None,
        supersample: int = 4,
        pixel_size: float | None = None,
    ) -> np.ndarray:
        """Noiseless attenuation image of one detector row at time `t`.

        Parameters
        ----------
        t : float
            Time, s.
        row : int
            Detector row; the slice lies at ``z = row_z(row)``.
        shape : tuple of int, optional
            ``(ny, nx)`` of the image; default ``(cols, cols)``.
        supersample : int
            Each pixel is the mean over ``supersample**2`` sub-pixel samples.
        pixel_size : float, optional
            Image pixel size, mm; default the detector pixel size.

        Returns
        -------
        ndarray, shape (ny, nx), float64
            ``mu`` in 1/mm, on the grid of the module docstring.
        """
        rows, cols = self.detector_shape
        if not 0 <= int(row) < rows or int(row) != row:
            raise GeometryError(f"row must be an integer in [0, {rows}); got {row!r}.")
        ny, nx = (cols, cols) if shape is None else _check_shape(shape, "shape")
        ss = int(supersample)
        if ss < 1:
            raise ConfigError(f"supersample must be >= 1; got {supersample!r}.")
        px = self.pixel_size if pixel_size is None else float(pixel_size)
        z = self.row_z(row)
        sub = ((np.arange(ss) + 0.5) / ss - 0.5) * px
        xs = ((np.arange(nx) - (nx - 1) / 2) * px)[:, None] + sub  # (nx, ss)
        ys = ((np.arange(ny) - (ny - 1) / 2) * px)[:, None] + sub
        xs, ys = xs.reshape(-1), ys.reshape(-1)  # sub-pixel centres
        cx, cy = self.container_center
        r2 = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2
        fine = np.where(r2 <= self.inner_radius**2, self.mu_liquid, 0.0)
        fine[(r2 > self.inner_radius**2) & (r2 <= self.container_radius**2)] = self.mu_wall
        step = px / ss
        x0, y0 = xs[0], ys[0]
        flat = fine.reshape(-1)
        nfy, nfx = fine.shape
        for g in self._sphere_groups(t):
            rho2 = g.radius**2 - (g.z - z) ** 2
            hit = rho2 > 0
            if not hit.any():
                continue
            gx, gy, rho = g.x[hit], g.y[hit], np.sqrt(rho2[hit])
            u = (gx - x0) / step  # fine column index of the centre
            v = (gy - y0) / step
            half = math.ceil(float(rho.max()) / step + 0.5)
            offs = np.arange(-half, half + 1)
            cc = np.rint(u)[:, None].astype(np.int64) + offs
            rr = np.rint(v)[:, None].astype(np.int64) + offs
            d2 = (((rr - v[:, None]) * step) ** 2)[:, :, None] + (((cc - u[:, None]) * step) ** 2)[
                :, None, :
            ]
            ok = d2 <= (rho**2)[:, None, None]
            ok &= ((rr >= 0) & (rr < nfy))[:, :, None] & ((cc >= 0) & (cc < nfx))[:, None, :]
            idx = (rr[:, :, None] * nfx + cc[:, None, :])[ok]
            flat += g.dmu * np.bincount(idx, minlength=flat.size)
        return fine.reshape(ny, ss, nx, ss).mean(axis=(1, 3))

    def truth_window(
        self,
        t0: float,
        t1: float,
        row: int,
        num: int = 8,
        **kwargs: Any,
    ) -> np.ndarray:
        """Mean of `truth` over ``num`` times evenly spaced in ``[t0, t1]``.

        A live slice is reconstructed from the projections of a time window;
        this is the matching (motion-blurred) reference.

        Parameters
        ----------
        t0, t1 : float
            Window, s.
        row : int
            Detector row.
        num : int
            Number of time samples (1 gives ``truth((t0 + t1) / 2, row)``).
        **kwargs
            Passed to `truth` (``shape``, ``supersample``, ``pixel_size``).

        Returns
        -------
        ndarray, shape (ny, nx), float64
        """
        if num < 1:
            raise ConfigError(f"num must be >= 1; got {num}.")
        times = [(t0 + t1) / 2] if num == 1 else np.linspace(t0, t1, num)
        return np.mean([self.truth(t, row, **kwargs) for t in times], axis=0)

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        """A JSON-able description that `from_description` turns back into this phantom.

        Returns
        -------
        dict
            ``type``, ``version``, every constructor argument (defaults resolved)
            and, for information, ``mu`` (1/mm per material) and ``n_beads``.
        """
        return {
            "type": _PHANTOM_TYPE,
            "version": _DESCRIPTION_VERSION,
            "detector_shape": list(self.detector_shape),
            "pixel_size": self.pixel_size,
            "center_of_rotation": self.center_of_rotation,
            "seed": self.seed,
            "container_radius": self.container_radius,
            "wall_thickness": self.wall_thickness,
            "container_center": list(self.container_center),
            "max_attenuation": self.max_attenuation,
            "wall_contrast": self.wall_contrast,
            "bead_contrast": self.bead_contrast,
            "n_bubbles": self.n_bubbles,
            "bubble_radius": list(self.bubble_radius),
            "rise_speed": self.rise_speed,
            "wobble_amplitude": self.wobble_amplitude,
            "wobble_frequency": self.wobble_frequency,
            "bed_fraction": self.bed_fraction,
            "bead_radius": self.bead_radius,
            "bed_packing": self.bed_packing,
            "mu": {
                "liquid": self.mu_liquid,
                "wall": self.mu_wall,
                "bead": self.mu_bead,
                "bubble": 0.0,
            },
            "n_beads": self.n_beads,
        }

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> BubbleColumn:
        """Rebuild a phantom from `describe` output (e.g. a start document's ``tomo.phantom``).

        Parameters
        ----------
        description : mapping
            As returned by `describe`; extra keys (``mu``, ``n_beads``, ``noise``) are ignored.

        Returns
        -------
        BubbleColumn
        """
        if description.get("type") != _PHANTOM_TYPE:
            raise ConfigError(
                f"Expected a phantom description with type={_PHANTOM_TYPE!r}; got "
                f"type={description.get('type')!r}."
            )
        if description.get("version") != _DESCRIPTION_VERSION:
            raise ConfigError(
                f"Expected description version {_DESCRIPTION_VERSION}; got "
                f"{description.get('version')!r}. It was written by another bluesky_jit."
            )
        kwargs = {
            k: v
            for k, v in description.items()
            if k not in {"type", "version", "mu", "n_beads", "noise"}
        }
        for key in ("detector_shape", "container_center", "bubble_radius"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (
            f"BubbleColumn(detector_shape={self.detector_shape}, pixel_size={self.pixel_size}, "
            f"seed={self.seed}, n_bubbles={self.n_bubbles}, n_beads={self.n_beads})"
        )


def _check_shape(shape: Any, what: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what} must be two positive integers (rows, cols); got {shape!r}."
        ) from None
    if a < 1 or b < 1 or (a, b) != tuple(shape):
        raise ConfigError(f"{what} must be two positive integers (rows, cols); got {shape!r}.")
    return a, b

"""Analytic dynamic phantoms for parallel-beam tomography.

Each is a glass column of liquid holding moving spheres, of three characters:

- `BubbleColumn`: a granular bed of small beads at the bottom and gas bubbles
  rising through the liquid above it (a few fast, sharp objects);
- `SinteringGrains`: a dense pack of grains of many sizes, most growing until
  they touch their neighbours and merge, the others shrinking away (fine
  texture, slow change everywhere);
- `PorousFlow`: a static pack of grains (a porous medium) through which a
  tracer front spreads from an injection point and recedes again (fine static
  texture, one moving edge).

Every part is a sphere or an infinite vertical cylinder, so projections are
exact line integrals (chord lengths) computed in closed form: no pixel-driven
forward projector, hence no inverse crime when the reconstruction code uses one.
All three share the same interface (`project`, `truth`, `truth_window`,
`describe`, `from_description`), so `PhantomSource` takes any of them.

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

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bluesky_jit.errors import ConfigError, GeometryError

__all__ = ["BubbleColumn", "PorousFlow", "SinteringGrains", "sphere_chord"]

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


class _Column:
    """A glass column of liquid holding spheres: geometry, exact projections and truth.

    Subclasses call `_set_column` first, then define `_sphere_groups` (and extend
    `_cylinders` for more vertical cylinders than the wall and the liquid), list
    their own constructor arguments in ``_ARGS`` and their derived numbers in `_info`.
    """

    _ARGS: tuple[str, ...] = ()

    def _set_column(
        self,
        detector_shape: tuple[int, int],
        pixel_size: float,
        center_of_rotation: float | None,
        seed: int,
        container_radius: float | None,
        wall_thickness: float | None,
        container_center: tuple[float, float],
        max_attenuation: float,
        wall_contrast: float,
    ) -> np.random.Generator:
        """Check and set the column's geometry and attenuations; returns the seeded generator."""
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
        if max_attenuation <= 0 or wall_contrast < 0:
            raise ConfigError(
                "max_attenuation must be > 0 and wall_contrast >= 0; got "
                f"{max_attenuation}, {wall_contrast}."
            )
        self.detector_shape = (rows, cols)
        self.pixel_size = float(pixel_size)
        self.center_of_rotation = cor
        self.seed = int(seed)
        self.container_radius = r_out
        self.wall_thickness = wall
        self.container_center = (float(container_center[0]), float(container_center[1]))
        self.max_attenuation = float(max_attenuation)
        self.wall_contrast = float(wall_contrast)
        self.mu_liquid = self.max_attenuation / self._peak_container_path(1.0)
        self.mu_wall = self.wall_contrast * self.mu_liquid
        return np.random.default_rng(self.seed)

    @property
    def inner_radius(self) -> float:
        """Inner radius of the glass wall, mm."""
        return self.container_radius - self.wall_thickness

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

    def _cylinders(self, t: float) -> list[tuple[float, float, float, float]]:
        """Vertical cylinders ``(x, y, radius, dmu)`` at time `t`: glass, then liquid."""
        cx, cy = self.container_center
        return [
            (cx, cy, self.container_radius, self.mu_wall),
            (cx, cy, self.inner_radius, self.mu_liquid - self.mu_wall),
        ]

    def _sphere_groups(self, t: float) -> list[_Spheres]:
        raise NotImplementedError

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
        s = (np.arange(cols) - self.center_of_rotation) * px
        out = np.empty((rows, cols))
        out[:] = sum(
            dmu * sphere_chord(r, s - (x * cos + y * sin)) for x, y, r, dmu in self._cylinders(t)
        )
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
        fine = np.zeros((ys.size, xs.size))
        for x, y, r, dmu in self._cylinders(t):
            fine += dmu * ((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2 <= r * r)
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

    # ------------------------------------------------------------------ description
    def _info(self) -> dict[str, Any]:
        """Derived numbers `describe` adds for information (ignored by `from_description`)."""
        return {"mu": {"liquid": self.mu_liquid, "wall": self.mu_wall}}

    def describe(self) -> dict[str, Any]:
        """A JSON-able description that `from_description` turns back into this phantom.

        Returns
        -------
        dict
            ``type`` (the class name), ``version``, every constructor argument
            (defaults resolved) and, for information, ``mu`` (1/mm per material)
            and other derived numbers.
        """
        names = ("detector_shape", "pixel_size", "center_of_rotation", "seed")
        names += ("container_radius", "wall_thickness", "container_center")
        names += ("max_attenuation", "wall_contrast", *self._ARGS)
        out: dict[str, Any] = {"type": type(self).__name__, "version": _DESCRIPTION_VERSION}
        for name in names:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out | self._info()

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> Any:
        """Rebuild a phantom from `describe` output (e.g. a start document's ``tomo.phantom``).

        Parameters
        ----------
        description : mapping
            As returned by `describe`; keys that are no constructor argument
            (``mu``, ``noise``, ...) are ignored.

        Returns
        -------
        The phantom, of this class.
        """
        if description.get("type") != cls.__name__:
            raise ConfigError(
                f"Expected a phantom description with type={cls.__name__!r}; got "
                f"type={description.get('type')!r}. Rebuild it with that type's class."
            )
        if description.get("version") != _DESCRIPTION_VERSION:
            raise ConfigError(
                f"Expected description version {_DESCRIPTION_VERSION}; got "
                f"{description.get('version')!r}. It was written by another bluesky_jit."
            )
        params = inspect.signature(cls).parameters
        kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in description.items() if k in params
        }
        return cls(**kwargs)


class BubbleColumn(_Column):
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

    _ARGS = (
        "bead_contrast",
        "n_bubbles",
        "bubble_radius",
        "rise_speed",
        "wobble_amplitude",
        "wobble_frequency",
        "bed_fraction",
        "bead_radius",
        "bed_packing",
    )

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
        rng = self._set_column(
            detector_shape,
            pixel_size,
            center_of_rotation,
            seed,
            container_radius,
            wall_thickness,
            container_center,
            max_attenuation,
            wall_contrast,
        )
        rows, r_in = self.detector_shape[0], self.inner_radius
        b_min, b_max = (0.05 * r_in, 0.10 * r_in) if bubble_radius is None else bubble_radius
        if not 0 < b_min <= b_max:
            raise ConfigError(
                f"bubble_radius must be (min, max) with 0 < min <= max; got {(b_min, b_max)}."
            )
        height = rows * self.pixel_size
        if not 0.0 <= bed_fraction < 1.0:
            raise ConfigError(f"bed_fraction must be in [0, 1); got {bed_fraction}.")
        if bead_contrast < 0:
            raise ConfigError(f"bead_contrast must be >= 0; got {bead_contrast}.")
        if n_bubbles < 0:
            raise ConfigError(f"n_bubbles must be >= 0; got {n_bubbles}.")
        self.bead_contrast = float(bead_contrast)
        self.n_bubbles = int(n_bubbles)
        self.bubble_radius = (float(b_min), float(b_max))
        self.rise_speed = 0.03 * height if rise_speed is None else float(rise_speed)
        self.wobble_amplitude = 0.3 * b_min if wobble_amplitude is None else float(wobble_amplitude)
        self.wobble_frequency = float(wobble_frequency)
        self.bed_fraction = float(bed_fraction)
        self.bead_radius = 0.03 * r_in if bead_radius is None else float(bead_radius)
        self.bed_packing = float(bed_packing)
        self.mu_bead = self.bead_contrast * self.mu_liquid

        z_top = -rows / 2 * self.pixel_size  # top edge of row 0
        z_bottom = rows / 2 * self.pixel_size  # bottom edge of the last row
        self._bed_top = z_bottom - self.bed_fraction * height
        self._beads = None
        if bed_fraction > 0:
            r = self.bead_radius
            beads = _pack_spheres(
                rng, (r, r), self, (self._bed_top + r, z_bottom + r), bed_packing, "bead_radius"
            )
            self._beads = _Spheres(*beads.T, dmu=self.mu_bead - self.mu_liquid)
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

    @property
    def n_beads(self) -> int:
        """Number of beads actually placed in the bed."""
        return 0 if self._beads is None else int(self._beads.x.size)

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

    def _info(self) -> dict[str, Any]:
        mu = {"liquid": self.mu_liquid, "wall": self.mu_wall, "bead": self.mu_bead, "bubble": 0.0}
        return {"mu": mu, "n_beads": self.n_beads}

    def __repr__(self) -> str:
        return (
            f"BubbleColumn(detector_shape={self.detector_shape}, pixel_size={self.pixel_size}, "
            f"seed={self.seed}, n_bubbles={self.n_bubbles}, n_beads={self.n_beads})"
        )


class SinteringGrains(_Column):
    """Grains that grow until they touch and merge, or shrink away: a sintering pack.

    A column (glass wall, light filling) packed over its whole height with
    non-overlapping grains of radii between ``grain_radius`` (random sequential
    addition). Each grain changes its radius linearly over its own time, between
    0.3 and 1.5 times `growth_time`, then stays: most grow until they touch their
    nearest neighbour (each grain takes half the smallest gap around it, so the
    pair with that gap meets and merges), a `shrink_fraction` of them shrink to
    nothing. Grains never overlap, so projections stay exact. Fine texture
    everywhere, changing slowly.

    Parameters
    ----------
    detector_shape, pixel_size, center_of_rotation, seed, container_radius,
    wall_thickness, container_center, max_attenuation, wall_contrast
        As in `BubbleColumn`; `max_attenuation` (through wall and filling) is
        lower by default: the grains add about 60 % more.
    grain_contrast : float
        Attenuation of the grains relative to the filling (> 0).
    grain_radius : tuple of float, optional
        ``(min, max)`` starting radius, mm; default 4 % and 9 % of the inner radius.
    packing : float
        Starting volume fraction of grains, in (0, 0.35].
    growth_time : float
        Typical time for a grain to reach its final size, s (> 0).
    shrink_fraction : float
        Fraction of the grains that shrink away, in [0, 1].

    Examples
    --------
    >>> pack = SinteringGrains(detector_shape=(8, 64), seed=1)
    >>> pack.radii(0.0).shape == pack.radii(30.0).shape
    True
    """

    _ARGS = ("grain_contrast", "grain_radius", "packing", "growth_time", "shrink_fraction")

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
        max_attenuation: float = 1.0,
        wall_contrast: float = 2.0,
        grain_contrast: float = 3.0,
        grain_radius: tuple[float, float] | None = None,
        packing: float = 0.3,
        growth_time: float = 60.0,
        shrink_fraction: float = 0.3,
    ) -> None:
        rng = self._set_column(
            detector_shape,
            pixel_size,
            center_of_rotation,
            seed,
            container_radius,
            wall_thickness,
            container_center,
            max_attenuation,
            wall_contrast,
        )
        self.grain_contrast = _positive(grain_contrast, "grain_contrast")
        self.grain_radius = _radius_range(
            grain_radius, self.inner_radius, (0.04, 0.09), "grain_radius"
        )
        self.packing = _packing(packing, "packing")
        self.growth_time = _positive(growth_time, "growth_time")
        if not 0.0 <= shrink_fraction <= 1.0:
            raise ConfigError(f"shrink_fraction must be in [0, 1]; got {shrink_fraction!r}.")
        self.shrink_fraction = float(shrink_fraction)
        self.mu_grain = self.grain_contrast * self.mu_liquid
        reach = 0.5 * self.detector_shape[0] * self.pixel_size + self.grain_radius[1]
        grains = _pack_spheres(
            rng, self.grain_radius, self, (-reach, reach), packing, "grain_radius"
        )
        self._xyz, self._r0 = grains[:, :3], grains[:, 3]
        # the final radius: half the smallest gap to a neighbour (all of it to the wall), or 0
        d = np.sqrt(((self._xyz[:, None, :] - self._xyz[None, :, :]) ** 2).sum(axis=2))
        gap = d - self._r0[:, None] - self._r0[None, :]
        np.fill_diagonal(gap, np.inf)
        rho = np.hypot(*(self._xyz[:, :2] - self.container_center).T)
        to_wall = self.inner_radius - rho - self._r0
        self._r1 = self._r0 + np.minimum(0.5 * gap.min(axis=1, initial=np.inf), to_wall)
        self._r1[rng.random(self._r0.size) < self.shrink_fraction] = 0.0
        self._t1 = self.growth_time * rng.uniform(0.3, 1.5, self._r0.size)

    @property
    def n_grains(self) -> int:
        """Number of grains placed (shrunk ones included)."""
        return int(self._r0.size)

    def radii(self, t: float) -> np.ndarray:
        """Grain radii at time `t` (s), mm; shape ``(n_grains,)``."""
        f = np.clip(float(t) / self._t1, 0.0, 1.0)
        return self._r0 + f * (self._r1 - self._r0)

    def _sphere_groups(self, t: float) -> list[_Spheres]:
        x, y, z = self._xyz.T
        return [_Spheres(x, y, z, self.radii(t), self.mu_grain - self.mu_liquid)]

    def _info(self) -> dict[str, Any]:
        mu = {"filling": self.mu_liquid, "wall": self.mu_wall, "grain": self.mu_grain}
        return {"mu": mu, "n_grains": self.n_grains}

    def __repr__(self) -> str:
        return (
            f"SinteringGrains(detector_shape={self.detector_shape}, seed={self.seed}, "
            f"n_grains={self.n_grains})"
        )


class PorousFlow(_Column):
    """A tracer front spreading through a static porous medium, then receding.

    A column of liquid packed over its whole height with static non-overlapping
    grains (random sequential addition, radii between ``grain_radius``). From an
    injection well, a vertical line at `injection_point`, a tracer that adds
    ``tracer_contrast`` times the liquid's attenuation spreads as a cylinder
    whose radius grows linearly from 0 to `front_radius` in half a `period` and
    shrinks back in the other half (injection, then withdrawal), over and
    over. The tracer soaks grains and pores alike (porous grains), so the
    projections stay exact. Fine static texture with one moving edge.

    Parameters
    ----------
    detector_shape, pixel_size, center_of_rotation, seed, container_radius,
    wall_thickness, container_center, max_attenuation, wall_contrast
        As in `BubbleColumn`; `max_attenuation` (through wall and liquid) is
        lower by default: grains and tracer add about 70 % more.
    grain_contrast : float
        Attenuation of the grains relative to the liquid (> 0).
    grain_radius : tuple of float, optional
        ``(min, max)`` radius, mm; default 3 % and 8 % of the inner radius.
    packing : float
        Volume fraction of grains, in (0, 0.35].
    tracer_contrast : float
        Attenuation the tracer adds, relative to the liquid (> 0).
    injection_point : tuple of float, optional
        ``(x, y)`` of the well, mm; default a quarter of the inner radius from
        the column axis along x.
    front_radius : float, optional
        Largest radius of the front, mm; default the distance from the well to
        the inner wall (the tracer stays inside the liquid).
    period : float
        Seconds for one injection and withdrawal (> 0).

    Examples
    --------
    >>> flow = PorousFlow(detector_shape=(8, 64), seed=1)
    >>> flow.front(0.0), flow.front(flow.period / 2) == flow.front_radius
    (0.0, True)
    """

    _ARGS = (
        "grain_contrast",
        "grain_radius",
        "packing",
        "tracer_contrast",
        "injection_point",
        "front_radius",
        "period",
    )

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
        max_attenuation: float = 1.2,
        wall_contrast: float = 2.0,
        grain_contrast: float = 2.5,
        grain_radius: tuple[float, float] | None = None,
        packing: float = 0.25,
        tracer_contrast: float = 1.0,
        injection_point: tuple[float, float] | None = None,
        front_radius: float | None = None,
        period: float = 80.0,
    ) -> None:
        rng = self._set_column(
            detector_shape,
            pixel_size,
            center_of_rotation,
            seed,
            container_radius,
            wall_thickness,
            container_center,
            max_attenuation,
            wall_contrast,
        )
        r_in, (cx, cy) = self.inner_radius, self.container_center
        self.grain_contrast = _positive(grain_contrast, "grain_contrast")
        self.grain_radius = _radius_range(grain_radius, r_in, (0.03, 0.08), "grain_radius")
        self.packing = _packing(packing, "packing")
        self.tracer_contrast = _positive(tracer_contrast, "tracer_contrast")
        well = (cx + 0.25 * r_in, cy) if injection_point is None else injection_point
        self.injection_point = (float(well[0]), float(well[1]))
        room = r_in - math.hypot(self.injection_point[0] - cx, self.injection_point[1] - cy)
        if room <= 0:
            raise ConfigError(
                f"injection_point {well} mm lies outside the liquid (inner radius {r_in:.3g} mm "
                f"around {self.container_center}); move it inside."
            )
        self.front_radius = _positive(
            room if front_radius is None else front_radius, "front_radius"
        )
        self.period = _positive(period, "period")
        self.mu_grain = self.grain_contrast * self.mu_liquid
        self.mu_tracer = self.tracer_contrast * self.mu_liquid
        reach = 0.5 * self.detector_shape[0] * self.pixel_size + self.grain_radius[1]
        grains = _pack_spheres(
            rng, self.grain_radius, self, (-reach, reach), packing, "grain_radius"
        )
        self._grains = _Spheres(*grains.T, dmu=self.mu_grain - self.mu_liquid)

    @property
    def n_grains(self) -> int:
        """Number of grains placed."""
        return int(self._grains.x.size)

    def front(self, t: float) -> float:
        """Radius of the tracer front at time `t` (s), mm."""
        phase = (float(t) / self.period) % 1.0
        return self.front_radius * (1.0 - abs(1.0 - 2.0 * phase))

    def _cylinders(self, t: float) -> list[tuple[float, float, float, float]]:
        return [*super()._cylinders(t), (*self.injection_point, self.front(t), self.mu_tracer)]

    def _sphere_groups(self, t: float) -> list[_Spheres]:
        return [self._grains]

    def _info(self) -> dict[str, Any]:
        mu = {"liquid": self.mu_liquid, "wall": self.mu_wall, "grain": self.mu_grain}
        return {"mu": mu | {"tracer_added": self.mu_tracer}, "n_grains": self.n_grains}

    def __repr__(self) -> str:
        return (
            f"PorousFlow(detector_shape={self.detector_shape}, seed={self.seed}, "
            f"n_grains={self.n_grains})"
        )


def _pack_spheres(
    rng: np.random.Generator,
    radius: tuple[float, float],
    column: _Column,
    z_range: tuple[float, float],
    packing: float,
    what: str,
) -> np.ndarray:
    """Non-overlapping spheres in the column by random sequential addition.

    Radii are uniform in `radius` (one value when min == max); centres lie
    inside the liquid, heights in `z_range`. Stops at about `packing` of the
    volume, or when no more fit. Returns ``(N, 4)``: ``x, y, z, radius``.
    """
    r_min, r_max = radius
    reach = column.inner_radius - r_max
    z_lo, z_hi = z_range
    if reach <= 0 or z_hi <= z_lo:
        raise ConfigError(f"{what}={r_max:.3g} mm does not fit the column; use a smaller {what}.")
    volume = math.pi * column.inner_radius**2 * (z_hi - z_lo)
    mean_r3 = r_max**3 if r_min == r_max else (r_max**4 - r_min**4) / (4 * (r_max - r_min))
    target = int(packing * volume / (4 / 3 * math.pi * mean_r3))
    spheres = np.empty((target, 4))
    placed = 0
    for _ in range(30 * target + 100):
        if placed == target:
            break
        r = r_max if r_min == r_max else rng.uniform(r_min, r_max)
        rho = (column.inner_radius - r) * math.sqrt(rng.random())
        phi = 2 * math.pi * rng.random()
        cand = (rho * math.cos(phi), rho * math.sin(phi), z_lo + (z_hi - z_lo) * rng.random())
        d2 = ((spheres[:placed, :3] - cand) ** 2).sum(axis=1)
        if placed and (d2 < (spheres[:placed, 3] + r) ** 2).any():
            continue
        spheres[placed] = (*cand, r)
        placed += 1
    spheres = spheres[:placed]
    spheres[:, :2] += column.container_center
    return spheres


def _positive(value: Any, what: str) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number > 0; got {value!r}.")
    return float(value)


def _packing(value: Any, what: str) -> float:
    if not (isinstance(value, int | float) and 0.0 <= value <= 0.35):
        raise ConfigError(
            f"{what} must be in [0, 0.35] (random packing jams near 0.38); got {value!r}."
        )
    return float(value)


def _radius_range(
    value: Any, inner_radius: float, default: tuple[float, float], what: str
) -> tuple[float, float]:
    lo, hi = (default[0] * inner_radius, default[1] * inner_radius) if value is None else value
    if not 0 < lo <= hi:
        raise ConfigError(f"{what} must be (min, max) in mm with 0 < min <= max; got {value!r}.")
    return float(lo), float(hi)


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

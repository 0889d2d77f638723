"""Seeing results: a live figure while runs are processed, and derived runs read back.

Live::

    view = LiveView(jit)      # jit: the JitProcess or JitCallback subscribed to the RunEngine
    view.start()              # IPython with an interactive backend (%matplotlib)
    view.stop()

The figure shows the newest reconstructed slice of each plane asked for
(``planes``: axial ``"xy"`` by default, ``"xz"``, ``"yz"`` or ``"all"``), the
newest denoised (axial) slice in the same grey window and the learning curve
(training loss and hold-out accuracy alpha, Graas et al. 2023, eq. 3). It
polls the callback's state on a GUI timer, so nothing runs on the RunEngine's
thread. From the command line, ``--live`` runs the work in a thread and the
figure in the main thread (:meth:`LiveView.run_while`); without a display it
says so and points to the web view (:mod:`bluesky_jit.apps.web`).

Read back (two lines)::

    from bluesky_jit.apps.live import show
    show("http://127.0.0.1:8000", "3f2a", api_key="...")   # derived or raw uid

:func:`bluesky_jit.apps.export.export` writes a derived run's slices as PNG (a
contact sheet), GIF (an animation), TIFF or NXdata HDF5, and raw runs as NXtomo
and DXchange.

matplotlib is imported only when a function needs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, NotDerivedError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from tiled.client.container import Container

    from ..callbacks import JitCallback
    from ..worker_process import JitProcess

__all__ = ["PLANES", "DerivedData", "LiveView", "open_derived", "read_derived", "show"]

logger = logging.getLogger(__name__)

PLANES = {"xy": "reconstruction", "xz": "reconstruction_xz", "yz": "reconstruction_yz"}
"""A slice plane's name -> its derived image stream."""
NO_DISPLAY = (
    "No display for the live figure (matplotlib backend {backend!r}: no DISPLAY or no GUI "
    "toolkit); it is drawn off-screen only. Watch the scan in a browser instead: the live "
    'web view, e.g. `bluesky-jit demo --web 8080` (README, "Live web view").'
)


@dataclass
class DerivedData:
    """A derived run's arrays, read back from the catalog.

    Attributes
    ----------
    uid, raw_uid : str
    reconstruction : ndarray, shape (N, H, W)
    reconstruction_index : ndarray, shape (N,)
        Last projection index of each reconstruction.
    denoised : ndarray, shape (M, H, W)
    denoised_index : ndarray, shape (M,)
    metrics : dict of str -> ndarray
        Columns of the ``metrics`` stream (``step``, ``loss``, ``alpha``, ...).
    units : dict of str -> str
        Units of the slices of each stream, as its descriptor declares (``1/mm``).
    start, stop : dict
        The run's start and stop documents.
    """

    uid: str
    raw_uid: str
    reconstruction: np.ndarray
    reconstruction_index: np.ndarray
    denoised: np.ndarray
    denoised_index: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)


def open_derived(
    catalog: str | Container,
    uid: str,
    *,
    api_key: str | None = None,
    container: str = "derived",
    raw_container: str = "raw",
) -> Container:
    """The derived run ``uid``, or the newest derived run of the raw run ``uid``.

    Parameters
    ----------
    catalog : str or tiled Container
        A Tiled URI, a data directory (see :func:`bluesky_jit.apps.session.open_catalog`),
        a catalog root, or a container of derived runs.
    uid : str
        Full or partial uid (a unique prefix) of a derived run, or of a raw run;
        or a scan id. A partial raw uid is looked up in ``raw_container`` of a
        catalog root (given a container of derived runs, a raw uid must be full).
    container, raw_container : str
        Names of the derived and raw runs' containers under a catalog root.
    """
    from ..catalog import derived_runs_for
    from ..errors import RunNotFoundError
    from .replay import lookup_run

    if isinstance(catalog, (str, Path)):
        from .session import open_catalog

        catalog = open_catalog(catalog, api_key=api_key, create=False).client
    runs = catalog
    specs = {spec.name for spec in getattr(catalog, "specs", [])}
    if "CatalogOfBlueskyRuns" not in specs:
        from ..catalog import runs_container

        runs = runs_container(catalog, container)
    try:
        return lookup_run(runs, uid)
    except RunNotFoundError:
        raw_uid = uid
        if len(uid) != 36 and runs is not catalog and raw_container in catalog:
            try:  # a partial raw uid: its full uid from the raw runs
                raw_uid = lookup_run(catalog[raw_container], uid).metadata["start"]["uid"]
            except RunNotFoundError:
                pass
        derived = derived_runs_for(runs, raw_uid) if len(raw_uid) == 36 else []
        if derived:
            return derived[-1]
        raise


def read_derived(run: Container) -> DerivedData:
    """Read a derived run's slices and metrics (see :class:`DerivedData`)."""
    start = dict(run.metadata["start"])
    stop = dict(run.metadata.get("stop") or {})
    if start.get("plan_name") != "bluesky_jit":
        raise NotDerivedError(
            f"Run {start.get('uid')} is not a bluesky_jit derived run (plan_name "
            f"{start.get('plan_name')!r}); pass a derived run's uid, or a raw uid to get its "
            "newest derived run."
        )
    images, units = {}, {}
    for stream in ("reconstruction", "denoised"):
        if stream in run:
            units[stream] = run[stream].metadata["data_keys"][stream].get("units", "")
            table = run[stream].read()
            images[stream] = (
                np.asarray(table[stream].values),
                np.asarray(table["projection_index"].values),
            )
        else:
            images[stream] = (np.empty((0, 1, 1), np.float32), np.empty(0, int))
    metrics: dict[str, np.ndarray] = {}
    if "metrics" in run:
        table = run["metrics"].read()
        metrics = {str(k): np.asarray(table[k].values) for k in table.data_vars}
    return DerivedData(
        uid=start["uid"],
        raw_uid=start.get("raw_uid", ""),
        reconstruction=images["reconstruction"][0],
        reconstruction_index=images["reconstruction"][1],
        denoised=images["denoised"][0],
        denoised_index=images["denoised"][1],
        metrics=metrics,
        units=units,
        start=start,
        stop=stop,
    )


def show(catalog: str | Container, uid: str | None = None, *, api_key: str | None = None) -> Figure:
    """Show a derived run: newest reconstruction, denoised slice and learning curve.

    ``catalog`` may also be a derived run itself (then no ``uid``).
    """
    run = catalog if uid is None else open_derived(catalog, uid, api_key=api_key)
    data = read_derived(run)
    figure = _new_figure()
    _Panels(figure).draw(
        [data.reconstruction[-1] if len(data.reconstruction) else None],
        data.denoised[-1] if len(data.denoised) else None,
        _metric_rows(data.metrics),
        title=_title(data.uid, data.raw_uid, data.stop.get("exit_status", "running")),
    )
    return figure


# ------------------------------------------------------------------------------ live
class LiveView:
    """A live figure of the run a JitProcess or JitCallback is processing.

    Parameters
    ----------
    jit : JitProcess or JitCallback
        Read through its ``progress()`` and ``summaries``.
    interval_s : float
        Refresh period.
    planes : str or sequence of str
        Reconstructed planes to show: ``"xy"`` (axial, default), ``"xz"``,
        ``"yz"`` (the vertical slices, ``vertical_slices`` setting), or ``"all"``.
    """

    def __init__(
        self,
        jit: JitProcess | JitCallback,
        *,
        interval_s: float = 0.5,
        planes: str | Sequence[str] = "xy",
    ) -> None:
        self.jit = jit
        self.interval_s = interval_s
        self.planes = planes_of(planes)
        self.figure: Figure | None = None
        self._panels: _Panels | None = None
        self._timer: Any = None
        self._shown: tuple[Any, ...] = ()

    def update(self) -> bool:
        """Redraw from the callback's newest state; True if anything changed."""
        summary = newest_summary(self.jit)
        if summary is None:
            return False
        key = (summary.raw_uid, summary.slices, summary.denoised, len(summary.metrics))
        if key == self._shown:
            return False
        self._make_figure()
        self._shown = key
        images = summary.images
        self._panels.draw(
            [images.get(PLANES[plane]) for plane in self.planes],
            summary.last_denoised,
            list(summary.metrics),
            title=_title(summary.derived_uid or "", summary.raw_uid, f"{summary.slices} slices"),
        )
        self.figure.canvas.draw_idle()
        return True

    def start(self) -> LiveView:
        """Show the figure and refresh it on a GUI timer (needs an interactive backend)."""
        import matplotlib.pyplot as plt

        self._make_figure()
        if not _interactive():
            logger.warning(NO_DISPLAY.format(backend=_backend()))
        if self._timer is None:
            self._timer = self.figure.canvas.new_timer(interval=int(self.interval_s * 1000))
            self._timer.add_callback(self.update)
        self._timer.start()
        if _interactive():
            plt.show(block=False)
        return self

    def stop(self) -> None:
        """Stop refreshing (the figure stays)."""
        if self._timer is not None:
            self._timer.stop()

    def run_while(self, busy: Callable[[], bool]) -> None:
        """Refresh in this (main) thread while ``busy()``; then draw once more."""
        import time

        import matplotlib.pyplot as plt

        interactive = _interactive()
        if interactive:
            plt.ion()
        else:
            logger.warning(NO_DISPLAY.format(backend=_backend()))
        while busy():
            self.update()
            if interactive and self.figure is not None:
                plt.pause(self.interval_s)
            else:
                time.sleep(self.interval_s)
        self.update()

    def save(self, path: str | Path) -> Path:
        """Save the current figure (PNG, PDF, SVG by suffix)."""
        if self.figure is None:
            raise ConfigError("Nothing to save yet: no run has produced a slice.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=110)
        return path

    def _make_figure(self) -> None:
        if self.figure is None:
            self.figure = _new_figure(len(self.planes))
            self._panels = _Panels(self.figure, self.planes)


def newest_summary(jit: JitProcess | JitCallback) -> Any:
    """The newest scan's RunSummary: running first, else the last finished; or None."""
    for summary in reversed(jit.progress()):
        if summary.geometry is not None:
            return summary
    finished = [s for s in list(jit.summaries) if s.last_slice is not None]
    return finished[-1] if finished else None


# --------------------------------------------------------------------------- drawing
def planes_of(planes: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one plane name or several -> a tuple of names of :data:`PLANES`."""
    names = tuple(PLANES) if planes == "all" else (planes,) if isinstance(planes, str) else planes
    unknown = [p for p in names if p not in PLANES]
    if unknown or not names:
        raise ConfigError(
            f"Live planes are {list(PLANES)} or 'all'; got {planes!r}. The vertical ones "
            "need the vertical_slices setting (on by default)."
        )
    return tuple(names)


def _backend() -> str:
    import matplotlib

    return matplotlib.get_backend().lower()


def _interactive() -> bool:
    return _backend() not in {"agg", "pdf", "svg", "ps", "cairo", "template"}


def _new_figure(planes: int = 1) -> Figure:
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(3.7 * (planes + 2), 3.6))


def _title(uid: str, raw_uid: str, status: str) -> str:
    return f"derived {uid[:8]} of raw run {raw_uid[:8]} ({status})"


def _metric_rows(metrics: Mapping[str, np.ndarray]) -> list[dict[str, float]]:
    steps = metrics.get("train_step", metrics.get("step"))
    if steps is None:
        return []
    missing = np.full(len(steps), math.nan)
    loss, alpha = metrics.get("loss", missing), metrics.get("alpha", missing)
    return [
        {"step": float(step), "loss": float(loss[i]), "alpha": float(alpha[i])}
        for i, step in enumerate(steps)
    ]


class _Panels:
    """Reconstruction (one per plane) | denoised | learning curve, redrawn in place."""

    def __init__(self, figure: Figure, planes: Sequence[str] = ("xy",)) -> None:
        self.figure = figure
        *self.ax_recs, self.ax_den, self.ax_loss = figure.subplots(1, len(planes) + 2)
        self.ax_alpha = self.ax_loss.twinx()
        self.images: dict[Any, Any] = {}
        titles = [f"reconstructed {p}" for p in planes]
        if tuple(planes) == ("xy",):
            titles = ["reconstructed"]
        for ax, name in zip([*self.ax_recs, self.ax_den], [*titles, "denoised"], strict=True):
            ax.set_title(name)
            ax.axis("off")
        self.ax_loss.set_xlabel("training step")
        self.ax_loss.set_ylabel("training loss")
        self.ax_alpha.set_ylabel("hold-out alpha (1: none, ~0.5: ideal)", color="tab:red")
        (self.loss_line,) = self.ax_loss.plot([], [], ".-", color="tab:blue")
        (self.alpha_line,) = self.ax_alpha.plot([], [], ".-", color="tab:red")
        self.ax_alpha.axhline(1.0, color="grey", ls="--", lw=0.8)
        self.ax_alpha.axhline(0.5, color="grey", ls=":", lw=0.8)
        figure.tight_layout()

    def draw(
        self,
        reconstructions: Sequence[np.ndarray | None],
        denoised: np.ndarray | None,
        metrics: Sequence[Mapping[str, Any]],
        *,
        title: str = "",
    ) -> None:
        """One reconstruction per plane (None: not yet), the denoised slice, metric rows."""
        axial = _window(reconstructions[0])  # the denoised slice in the first plane's window
        for ax, image in zip(
            [*self.ax_recs, self.ax_den], [*reconstructions, denoised], strict=True
        ):
            if image is None:
                continue
            image = np.asarray(image)
            window = axial if ax is self.ax_den else _window(image)
            if ax in self.images and self.images[ax].get_array().shape == image.shape:
                self.images[ax].set_data(image)
                self.images[ax].set_clim(*window)
            else:
                self.images[ax] = ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1])
        steps = [m.get("step", math.nan) for m in metrics]
        loss = [m.get("loss", math.nan) for m in metrics]
        alpha = [m.get("alpha", math.nan) for m in metrics]
        self.loss_line.set_data(steps, loss)
        self.alpha_line.set_data(steps, alpha)
        finite = [v for v in loss if np.isfinite(v) and v > 0]
        if finite:
            self.ax_loss.set_yscale("log")
        for ax in (self.ax_loss, self.ax_alpha):
            ax.relim()
            ax.autoscale_view()
        if title:
            self.figure.suptitle(title, fontsize=10)


def _window(image: np.ndarray | None) -> tuple[float, float]:
    if image is None or not np.isfinite(image).any():
        return (0.0, 1.0)
    lo, hi = np.nanpercentile(image, [1, 99])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def _to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    scaled = (np.asarray(image, dtype=np.float64) - lo) / (hi - lo)
    return (np.clip(np.nan_to_num(scaled), 0, 1) * 255).astype(np.uint8)

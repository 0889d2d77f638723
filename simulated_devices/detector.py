"""`TomoDetector`: an ophyd-async area detector that images a frame source.

It is a `StandardDetector` composed like ophyd-async's own ``SimBlobDetector``:
trigger logic (how many frames), acquire logic (a task that takes them) and
data logic (the HDF5 file and its StreamResource). On each frame it reads the
*current* rotation stage angle, shutter and sample stage, asks the source for
the frame at virtual time ``t = frame_index / frame_rate``, and appends it to an
SWMR HDF5 file (dataset ``/entry/data/data``, shape (N, rows, cols)).

Documents: data key ``det`` (the detector name) is external (``STREAM:``), with
``shape [1, rows, cols]`` (ophyd-async puts ``collections_per_event`` first) and
one StreamResource per file plus StreamDatum per event. Two small readings go
inline in each event: ``det-frame_index`` (frame number since the detector was
made, darks and flats included) and ``det-sim_time`` (virtual time, s), so
consumers can look up the phantom truth of every frame.

A new file is opened at the first trigger after each ``stage``; stage and
unstage the detector around every stream (see `simulated_devices.plans`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    ReadableDataProvider,
    SignalR,
    StandardDetector,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    soft_signal_r_and_setter,
)

from .acquisition import DATASET, FrameClock, FrameFile
from .motion import BeamlineReader
from .sources import FrameSource

__all__ = ["TomoDetector"]


class _Camera:
    """What the logics share: source, clock, beamline, the open file and the counters."""

    def __init__(
        self,
        *,
        source: FrameSource,
        clock: FrameClock,
        beamline: BeamlineReader,
        rng: np.random.Generator,
        set_written: Any,
        set_index: Any,
        set_time: Any,
    ) -> None:
        self.source = source
        self.clock = clock
        self.beamline = beamline
        self.rng = rng
        self.file: FrameFile | None = None
        self.frames_to_take = 1
        self._set_written = set_written
        self._set_index = set_index
        self._set_time = set_time

    def open(self, path: Path) -> None:
        self.close()
        self.file = FrameFile(path, self.source.detector_shape, self.source.dtype)
        self._set_written(0)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    async def take_frames(self) -> None:
        n = self.frames_to_take
        for k in range(n):
            try:
                await self._take_one()
            except Exception:
                # Release the trigger that waits on frames_written; wait_for_idle
                # then re-raises this error instead of a bare timeout.
                done = 0 if self.file is None else self.file.count
                self._set_written(done + n - k)
                raise

    async def _take_one(self) -> None:
        if self.file is None:
            raise RuntimeError("No file open: the detector was triggered before prepare.")
        await asyncio.sleep(self.clock.wait_time())
        state = await self.beamline.read_async()
        index, t = self.clock.tick()
        frame = await asyncio.to_thread(
            self.source.frame,
            angle_deg=state.angle_deg,
            t=t,
            index=index,
            shutter_open=state.shutter_open,
            sample_in=state.sample_in,
            rng=self.rng,
        )
        written = self.file.append(np.asarray(frame))
        self._set_index(index)
        self._set_time(t)
        self._set_written(written)


class _TriggerLogic(DetectorTriggerLogic):
    def __init__(self, camera: _Camera) -> None:
        self._camera = camera

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        self._camera.frames_to_take = num

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _AcquireLogic(DetectorAcquireLogic):
    def __init__(self, camera: _Camera) -> None:
        self._camera = camera
        self._task: asyncio.Task | None = None

    async def start_acquiring(self) -> None:
        self._task = asyncio.create_task(self._camera.take_frames())

    async def wait_for_idle(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def ensure_stopped(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class _FrameDataLogic(DetectorDataLogic):
    """Opens the HDF5 file and describes it as one StreamResource."""

    def __init__(self, path_provider: PathProvider, camera: _Camera, written: SignalR[int]):
        self._path_provider = path_provider
        self._camera = camera
        self._written = written

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self._path_provider(datakey_name)
        directory = Path(str(info.directory_path))
        directory.mkdir(parents=True, exist_ok=True)
        self._camera.open(directory / f"{info.filename}.h5")
        rows, cols = self._camera.source.detector_shape
        resource = StreamResourceInfo(
            data_key=datakey_name,
            shape=(rows, cols),
            chunk_shape=(1, rows, cols),
            dtype_numpy=np.dtype(self._camera.source.dtype).str,
            parameters={"dataset": DATASET},
        )
        return StreamResourceDataProvider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=[resource],
            mimetype="application/x-hdf5",
            collections_written_signal=self._written,
        )

    async def stop(self) -> None:
        self._camera.close()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class _SignalsProvider(ReadableDataProvider):
    def __init__(self, signals: Sequence[SignalR]) -> None:
        self._signals = signals

    async def make_datakeys(self) -> dict[str, DataKey]:
        keys: dict[str, DataKey] = {}
        for sig in self._signals:
            keys.update(await sig.describe())
        return keys

    async def make_readings(self) -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        for sig in self._signals:
            out.update(await sig.read(cached=False))
        return out


class _FrameInfoDataLogic(DetectorDataLogic):
    """Inline readings ``<name>-frame_index`` and ``<name>-sim_time`` (step scans only)."""

    datakey_suffix = "-frame_info"

    def __init__(self, signals: Sequence[SignalR]) -> None:
        self._signals = signals

    async def prepare_single(self, datakey_name: str) -> ReadableDataProvider:
        return _SignalsProvider(self._signals)


class TomoDetector(StandardDetector):
    """Simulated tomography camera (ophyd-async) that writes SWMR HDF5 files.

    Parameters
    ----------
    source : FrameSource
        What the camera sees (`PhantomSource`, `RecordingSource`).
    path_provider : ophyd_async.core.PathProvider
        Where files go, e.g. ``StaticPathProvider(UUIDFilenameProvider(), save_path)``.
    rot_stage, shutter, sample_stage : ophyd-async devices, optional
        Read (``locate()`` / ``get_value()``) at every frame, never made children.
        ``None``: angle 0, shutter open, sample in.
    frame_rate : float, optional
        Frames per second of the virtual clock; None freezes time at 0.
    paced : bool
        Hold each frame until its absolute deadline (see `FrameClock`).
    seed : int
        Seed of the detector's noise generator.
    name : str
        Device name and data key.

    Notes
    -----
    Create a ``RunEngine`` first and connect the detector in its event loop
    (``with init_devices(): ...`` or `simulated_devices.hw`).
    """

    def __init__(
        self,
        *,
        source: FrameSource,
        path_provider: PathProvider,
        rot_stage: Any = None,
        shutter: Any = None,
        sample_stage: Any = None,
        frame_rate: float | None = None,
        paced: bool = False,
        seed: int = 0,
        name: str = "det",
    ) -> None:
        self.source = source
        self.clock = FrameClock(frame_rate=frame_rate, paced=paced)
        self.frame_index, set_index = soft_signal_r_and_setter(int, -1)
        self.sim_time, set_time = soft_signal_r_and_setter(float, 0.0, units="s")
        self.frames_written, set_written = soft_signal_r_and_setter(int, 0)
        self._camera = _Camera(
            source=source,
            clock=self.clock,
            beamline=BeamlineReader(
                rot_stage=rot_stage, shutter=shutter, sample_stage=sample_stage
            ),
            rng=np.random.default_rng(seed),
            set_written=set_written,
            set_index=set_index,
            set_time=set_time,
        )
        self.add_detector_logics(
            _TriggerLogic(self._camera),
            _AcquireLogic(self._camera),
            _FrameDataLogic(path_provider, self._camera, self.frames_written),
            _FrameInfoDataLogic([self.frame_index, self.sim_time]),
        )
        super().__init__(name=name)

    @property
    def frame_rate(self) -> float | None:
        """Frames per second of the virtual clock (None: static sample)."""
        return self.clock.frame_rate

    @property
    def paced(self) -> bool:
        """Whether frames wait for their wall-clock deadlines."""
        return self.clock.paced

"""`TomoDetectorV1`: the same simulated camera as an ophyd v1 device.

Two modes:

- ``external=True`` behaves like an areaDetector with an HDF5 plugin: ``stage``
  opens a new file (dataset ``/entry/data/data``, shape (N, rows, cols)) and
  emits a ``Resource`` (spec ``AD_HDF5``, ``resource_kwargs
  {"frame_per_point": 1}``); each trigger appends a frame and emits a ``Datum``
  (``datum_kwargs {"point_number": i}``) whose id is the event value. The data
  key has ``shape [1, rows, cols]`` and ``external "FILESTORE:"``, as ophyd's
  AreaDetector reports it with ``num_images = 1``.
- ``external=False`` puts the frame itself, shape (rows, cols), in the event.

Like `TomoDetector`, events also carry ``det-frame_index`` and ``det-sim_time``.
Trigger runs in a thread and returns a status, so pacing does not block the
RunEngine's event loop.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ophyd
from event_model import compose_resource
from ophyd.status import DeviceStatus

from bluesky_jit.errors import ConfigError

from .acquisition import FrameClock, FrameFile
from .motion import BeamlineReader
from .sources import FrameSource

__all__ = ["TomoDetectorV1"]


class TomoDetectorV1(ophyd.Device):
    """Simulated tomography camera (ophyd v1), files + Resource/Datum or inline frames.

    Parameters
    ----------
    source : FrameSource
        What the camera sees.
    save_path : str or Path
        Directory for the HDF5 files (``external=True``); also the Resource ``root``.
    rot_stage, shutter, sample_stage : ophyd v1 devices, optional
        Read (``position`` / ``get()``) at every frame. ``None``: angle 0,
        shutter open, sample in.
    external : bool
        Files with Resource/Datum (True) or frames inline in events (False).
    frame_rate : float, optional
        Frames per second of the virtual clock; None freezes time at 0.
    paced : bool
        Hold each frame until its absolute deadline (see `FrameClock`).
    seed : int
        Seed of the detector's noise generator.
    name : str
        Device name and data key.
    """

    def __init__(
        self,
        *,
        source: FrameSource,
        save_path: str | Path,
        rot_stage: Any = None,
        shutter: Any = None,
        sample_stage: Any = None,
        external: bool = True,
        frame_rate: float | None = None,
        paced: bool = False,
        seed: int = 0,
        name: str = "det",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.source = source
        self.save_path = Path(save_path)
        self.external = bool(external)
        self.clock = FrameClock(frame_rate=frame_rate, paced=paced)
        self._beamline = BeamlineReader(
            rot_stage=rot_stage, shutter=shutter, sample_stage=sample_stage, api="v1"
        )
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._file: FrameFile | None = None
        self._bundle: Any = None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
        self._reading: dict[str, dict[str, Any]] = {}

    @property
    def frame_rate(self) -> float | None:
        """Frames per second of the virtual clock (None: static sample)."""
        return self.clock.frame_rate

    @property
    def paced(self) -> bool:
        """Whether frames wait for their wall-clock deadlines."""
        return self.clock.paced

    # ---------------------------------------------------------------- staging
    def stage(self) -> list[Any]:
        """Open a new HDF5 file and queue its Resource (external mode)."""
        staged = super().stage()
        if self.external:
            self.save_path.mkdir(parents=True, exist_ok=True)
            fname = f"{uuid.uuid4()}.h5"
            self._file = FrameFile(
                self.save_path / fname, self.source.detector_shape, self.source.dtype
            )
            self._bundle = compose_resource(
                spec="AD_HDF5",
                root=str(self.save_path),
                resource_path=fname,
                resource_kwargs={"frame_per_point": 1},
            )
            self._asset_docs.append(("resource", self._bundle.resource_doc))
        return staged

    def unstage(self) -> list[Any]:
        """Close the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = None
            self._bundle = None
            self._asset_docs.clear()
        return super().unstage()

    # ---------------------------------------------------------------- acquisition
    def trigger(self) -> DeviceStatus:
        """Take one frame in a thread; the status finishes when it is written."""
        if self.external and self._file is None:
            raise ConfigError(
                f"{self.name} writes files (external=True) and must be staged before "
                "trigger; bluesky plans stage their detectors, or call det.stage()."
            )
        status = DeviceStatus(self)
        threading.Thread(target=self._acquire, args=(status,), daemon=True).start()
        return status

    def _acquire(self, status: DeviceStatus) -> None:
        try:
            with self._lock:
                time.sleep(self.clock.wait_time())
                state = self._beamline.read_sync()
                index, t = self.clock.tick()
                frame = np.asarray(
                    self.source.frame(
                        angle_deg=state.angle_deg,
                        t=t,
                        index=index,
                        shutter_open=state.shutter_open,
                        sample_in=state.sample_in,
                        rng=self._rng,
                    )
                )
                now = time.time()
                if self.external:
                    if self._file is None:
                        raise ConfigError(f"{self.name} was unstaged during its exposure.")
                    point = self._file.append(frame) - 1
                    datum = self._bundle.compose_datum(datum_kwargs={"point_number": point})
                    self._asset_docs.append(("datum", datum))
                    value: Any = datum["datum_id"]
                else:
                    value = frame
                self._reading = {
                    self.name: {"value": value, "timestamp": now},
                    f"{self.name}-frame_index": {"value": index, "timestamp": now},
                    f"{self.name}-sim_time": {"value": t, "timestamp": now},
                }
        except Exception as exc:
            status.set_exception(exc)
        else:
            status.set_finished()

    # ---------------------------------------------------------------- reading
    def describe(self) -> dict[str, dict[str, Any]]:
        """Data keys: the frame (external or inline), frame index, virtual time."""
        rows, cols = self.source.detector_shape
        image: dict[str, Any] = {
            "source": f"SIM:{self.name}",
            "dtype": "array",
            "dtype_numpy": np.dtype(self.source.dtype).str,
        }
        if self.external:
            image.update(shape=[1, rows, cols], external="FILESTORE:")
        else:
            image.update(shape=[rows, cols])
        return {
            self.name: image,
            f"{self.name}-frame_index": {
                "source": f"SIM:{self.name}-frame_index",
                "dtype": "integer",
                "shape": [],
            },
            f"{self.name}-sim_time": {
                "source": f"SIM:{self.name}-sim_time",
                "dtype": "number",
                "shape": [],
                "units": "s",
            },
        }

    def read(self) -> dict[str, dict[str, Any]]:
        """The readings of the last trigger."""
        return dict(self._reading)

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Resource and Datum documents not yet collected."""
        while self._asset_docs:
            yield self._asset_docs.popleft()

    @property
    def hints(self) -> dict[str, list[str]]:
        """The frame is the hinted field."""
        return {"fields": [self.name]}

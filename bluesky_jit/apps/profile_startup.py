"""The bluesky-jit profile: a RunEngine, the catalog, the beamline, live denoising and plans.

One startup file, run by IPython (``ipython --profile-dir=DIR`` after
``bluesky-jit profile install DIR``), by a queue server (``start-re-manager
--startup-dir DIR/startup``) or imported as a module. Settings come from
``BLUESKY_JIT_CONFIG`` (a settings file) and the ``BLUESKY_JIT_*`` variables
(:func:`bluesky_jit.apps.session.profile_settings`).

Loading it is light: the catalog (an embedded Tiled server for a data
directory) and the denoising child process start at the first run, and
stop when this process ends. The plans are generator functions that take
the devices by name in a queue server: ``tomo(det, rot_stage, shutter,
sample_stage, num_angles=90, rotations=1)`` and ``tomo_step(...)``.
"""

from typing import Any

from bluesky import RunEngine
from bluesky.protocols import Movable, Readable

from bluesky_jit.apps.demo import checkpoint_each_frame
from bluesky_jit.apps.live import LiveView
from bluesky_jit.apps.session import (
    LazyCatalog,
    at_exit,
    attach,
    jit_config,
    profile_settings,
    simulated_beamline,
)
from simulated_devices import plans as simulated_plans

settings = profile_settings()
RE = RunEngine({})
catalog = LazyCatalog(
    settings["catalog"].get("uri"),
    api_key=settings["catalog"].get("api_key"),
    data_dir=settings["catalog"].get("data_dir"),
)
beamline = simulated_beamline(catalog.data_dir / "raw", settings["beamline"])
det, rot_stage, shutter, sample_stage = beamline.plan_devices  # a real profile makes its own
jit = attach(RE, catalog, config=jit_config(settings["jit"]), lazy=True)
live = LiveView(jit)  # live.start() shows the live figure (%matplotlib first), live.stop()
at_exit(jit.close, catalog.close)
SAMPLE = "bubble column (simulated)"


def tomo(
    det: Readable,
    rot_stage: Movable,
    shutter: Movable,
    sample_stage: Movable,
    num_angles: int = 90,
    rotations: int = 1,
    num_darks: int = 10,
    num_flats: int = 10,
    sample: str = SAMPLE,
) -> Any:
    """Continuous tomography: darks, flats, then ``rotations`` turns of ``num_angles`` frames.

    Each 180 degrees has ``num_angles`` projections. A checkpoint precedes
    each frame, so one Ctrl-C pauses within a frame (then ``RE.resume()`` or
    ``RE.abort()``). Returns the run uid.

    Parameters
    ----------
    det : Readable
        The detector.
    rot_stage : Movable
        The rotation stage (degrees).
    shutter : Movable
        The shutter (darks with it closed).
    sample_stage : Movable
        Moves the sample out of the beam for the flats.
    num_angles : int
        Projections per 180 degrees.
    rotations : int
        Half turns in the run.
    num_darks : int
        Dark frames.
    num_flats : int
        Flat (open beam) frames.
    sample : str
        Recorded in the start document.
    """
    plan = simulated_plans.tomo_continuous(
        det, rot_stage, shutter, sample_stage, num_angles=num_angles, rotations=rotations,
        num_darks=num_darks, num_flats=num_flats, sample=sample,
    )  # fmt: skip
    return (yield from checkpoint_each_frame(plan))


def tomo_step(
    det: Readable,
    rot_stage: Movable,
    shutter: Movable,
    sample_stage: Movable,
    num_angles: int = 90,
    num_darks: int = 10,
    num_flats: int = 10,
    sample: str = SAMPLE,
) -> Any:
    """Step tomography: darks, flats, then ``num_angles`` frames over 180 degrees.

    Parameters are those of :func:`tomo` (one rotation). Returns the run uid.
    """
    plan = simulated_plans.tomo_scan(
        det, rot_stage, shutter, sample_stage, num_angles=num_angles,
        num_darks=num_darks, num_flats=num_flats, sample=sample,
    )  # fmt: skip
    return (yield from checkpoint_each_frame(plan))


print(f"bluesky-jit profile: {catalog.description}")
print("bluesky-jit profile: RE(tomo(det, rot_stage, shutter, sample_stage, num_angles=90))")

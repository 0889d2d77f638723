"""TomoIngest on composed documents: layouts, orderings and bad input.

Documents here are made with event_model's compose functions (no devices),
so that every ordering a RunEngine or a replay can produce is covered; the
integration tests drive the same code from a real RunEngine.
"""

import h5py
import numpy as np
import pytest
from event_model import compose_run

from bluesky_jit.ingest import CalibrationStore, TomoIngest

ROWS, COLS, N_ANGLES = 2, 32, 24


class Sink:
    def __init__(self):
        self.calls = []
        self.projections = []
        self.problems = []
        self.geometry = "unset"

    def begin(self, start, geometry):
        self.geometry = geometry

    def calibration(self, darks, flats):
        self.calls.append(("calibration", darks.shape, flats.shape))

    def projection(self, frame, *, angle_deg, index):
        self.projections.append((index, angle_deg, frame.copy()))

    def problem(self, error):
        self.problems.append(str(error))

    def end(self, stop):
        self.calls.append(("end", stop["exit_status"]))


def tomo_md(**extra):
    tomo = {
        "beam": "parallel",
        "detector_shape": [ROWS, COLS],
        "num_angles": N_ANGLES,
        "angular_range": [0, 180],
        "angle_key": "rot_stage",
        "detector_key": "det",
    }
    tomo.update(extra)
    return {"tomo": tomo}


def frame(value):
    return np.full((ROWS, COLS), float(value))


def inline_run(*, streams=("dark", "flat", "primary"), md=None, angles=True):
    """Documents of a run with inline frames; primary frame k has value 500 + k."""
    bundle = compose_run(metadata=md if md is not None else tomo_md())
    docs = [("start", bundle.start_doc)]
    image = {"dtype": "array", "shape": [ROWS, COLS], "source": "sim"}
    angle_key = {"dtype": "number", "shape": [], "source": "sim"}
    for stream in streams:
        keys = {"det": image}
        if stream == "primary" and angles:
            keys["rot_stage"] = angle_key
        desc = bundle.compose_descriptor(name=stream, data_keys=keys)
        docs.append(("descriptor", desc.descriptor_doc))
        n = N_ANGLES if stream == "primary" else 3
        for k in range(n):
            value = {"dark": 100, "flat": 1100, "primary": 500 + k}[stream]
            data = {"det": frame(value)}
            if stream == "primary" and angles:
                data["rot_stage"] = k * 180 / N_ANGLES
            docs.append(("event", desc.compose_event(data=data, timestamps={k2: 0 for k2 in data})))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def feed(docs, **kw):
    sink = Sink()
    ingest = TomoIngest(sink, **kw)
    for name, doc in docs:
        ingest(name, doc)
    return sink, ingest


def test_inline_run_delivers_every_projection_with_its_angle_in_order():
    sink, ingest = feed(inline_run())
    assert sink.problems == []
    assert sink.calls[0] == ("calibration", (3, ROWS, COLS), (3, ROWS, COLS))
    assert [p[0] for p in sink.projections] == list(range(N_ANGLES))
    assert sink.projections[5][1] == pytest.approx(5 * 180 / N_ANGLES)
    assert sink.projections[5][2][0, 0] == 505
    assert ingest.projections == N_ANGLES


def test_flats_after_the_rotation_still_correct_every_frame():
    sink, _ = feed(inline_run(streams=("dark", "primary", "flat")))
    assert sink.problems == []
    assert len(sink.projections) == N_ANGLES
    assert sink.calls[0][0] == "calibration"


def test_missing_flats_is_a_clear_problem_and_the_run_still_ends():
    sink, _ = feed(inline_run(streams=("dark", "primary")))
    assert sink.projections == []
    assert any("no flat fields" in p and "num_flats" in p for p in sink.problems)
    assert sink.calls[-1] == ("end", "success")


def test_missing_angle_reading_names_the_key():
    sink, _ = feed(inline_run(angles=False))
    assert sink.projections == []
    assert any("no 'rot_stage' reading" in p for p in sink.problems)


def test_unknown_beam_type_is_reported_not_raised():
    sink, _ = feed(inline_run(md=tomo_md(beam="fan")))
    assert sink.geometry is None
    assert any("Unknown beam type 'fan'" in p for p in sink.problems)


def test_separate_dark_flat_run_hex_layout():
    store = CalibrationStore()
    calib = inline_run(streams=("dark", "flat"), md=tomo_md(role="dark_flat"))
    feed(calib, calibrations=store)
    uid = calib[0][1]["uid"]
    sink, _ = feed(
        inline_run(streams=("primary",), md=tomo_md(dark_flat_uid=uid)), calibrations=store
    )
    assert sink.problems == []
    assert len(sink.projections) == N_ANGLES


def stream_run(tmp_path, *, replay_order):
    """A run whose frames are in an HDF5 file, announced by StreamResource/StreamDatum."""
    path = tmp_path / "frames.h5"
    values = {"dark": [100] * 3, "flat": [1100] * 3, "primary": [500 + k for k in range(8)]}
    bundle = compose_run(metadata=tomo_md())
    docs = [("start", bundle.start_doc)]
    with h5py.File(path, "w") as f:
        for stream, vals in values.items():
            f[f"/{stream}"] = np.stack([frame(v) for v in vals])
    image = {"dtype": "array", "shape": [ROWS, COLS], "source": "sim", "external": "STREAM:"}
    angle_key = {"dtype": "number", "shape": [], "source": "sim"}
    for stream, vals in values.items():
        keys = {"det": image, **({"rot_stage": angle_key} if stream == "primary" else {})}
        desc = bundle.compose_descriptor(name=stream, data_keys=keys)
        res = bundle.compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=f"file://localhost{path}",
            data_key="det",
            parameters={"dataset": f"/{stream}"},
        )
        datum = res.compose_stream_datum(
            indices={"start": 0, "stop": len(vals)},
            seq_nums={"start": 1, "stop": len(vals) + 1},
            descriptor=desc.descriptor_doc,
        )
        events = []
        if stream == "primary":
            events = [
                desc.compose_event(data={"rot_stage": 7.5 * k}, timestamps={"rot_stage": 0})
                for k in range(len(vals))
            ]
        docs.append(("descriptor", desc.descriptor_doc))
        asset_docs = [("stream_resource", res.stream_resource_doc), ("stream_datum", datum)]
        ev = [("event", e) for e in events]
        docs += ev + asset_docs if replay_order else asset_docs + ev
    docs.append(("stop", bundle.compose_stop()))
    return docs


@pytest.mark.parametrize("replay_order", [False, True])
def test_stream_resource_frames_join_their_events_in_either_order(tmp_path, replay_order):
    sink, _ = feed(stream_run(tmp_path, replay_order=replay_order))
    assert sink.problems == []
    assert [p[0] for p in sink.projections] == list(range(8))
    assert [p[2][0, 0] for p in sink.projections] == [500 + k for k in range(8)]
    assert sink.projections[3][1] == 22.5


def test_unreadable_detector_file_is_reported(tmp_path):
    docs = stream_run(tmp_path, replay_order=False)
    (tmp_path / "frames.h5").unlink()
    sink, _ = feed(docs)
    assert any("Could not read frames" in p for p in sink.problems)

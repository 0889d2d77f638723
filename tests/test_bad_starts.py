"""Every tomography start yields a derived run, even when its metadata cannot be read."""

from __future__ import annotations

import event_model
import pytest

from bluesky_jit.callbacks import JitCallback

from .test_callbacks import CONFIG, Collector

GOOD_TOMO = {"num_angles": 24, "angular_range": [0, 180], "detector_shape": [8, 48]}


def _run(jit, tomo):
    bundle = event_model.compose_run(metadata={"tomo": tomo, "plan_name": "tomo"})
    jit("start", bundle.start_doc)
    jit("stop", bundle.compose_stop())
    assert jit.flush(timeout=60)
    return bundle.start_doc["uid"]


@pytest.mark.parametrize(
    ("tomo", "said"),
    [
        ("yes", "must be a mapping"),
        ({**GOOD_TOMO, "num_angles": "abc"}, "num_angles"),
        ({**GOOD_TOMO, "num_angles": [24]}, "num_angles"),
    ],
)
def test_unreadable_scan_metadata_gives_a_failed_derived_run(tmp_path, tomo, said):
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path / "derived")
    uid = _run(jit, tomo)
    jit.close()
    (start,) = derived.named("start")
    (stop,) = derived.named("stop")
    assert start["raw_uid"] == uid
    assert stop["exit_status"] == "fail"
    assert said in stop["reason"], stop["reason"]
    assert jit.summaries[0].exit_status == "fail"


def test_a_derived_directory_that_cannot_be_made_fails_the_run_not_the_callback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # mkdir below it fails, even as root
    derived = Collector()
    jit = JitCallback(config=CONFIG, emit=derived, directory=blocker / "derived")
    _run(jit, GOOD_TOMO)
    jit.close()
    (stop,) = derived.named("stop")
    assert stop["exit_status"] == "fail"
    assert "Cannot create the derived runs' directory" in stop["reason"]

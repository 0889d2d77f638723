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


def test_events_the_stop_counts_but_that_never_came_fail_the_run(RE, tmp_path):
    """A bus that lost two projection events: the run says so instead of a silent success."""
    from .test_callbacks import recorded_inline_scan

    raw = recorded_inline_scan(RE, tmp_path)
    primary = {d["uid"] for d in raw.named("descriptor") if d["name"] == "primary"}
    lost = {7, 8}
    jit = JitCallback(config=CONFIG.replace(refresh_every=4), emit=None, directory=tmp_path)
    for name, doc in raw.docs:
        if name == "event" and doc["descriptor"] in primary and doc["seq_num"] in lost:
            continue
        jit(name, doc)
    assert jit.flush(timeout=60)
    jit.close()
    summary = jit.summaries[0]
    assert summary.exit_status == "fail"
    assert "2 of the 32 'primary' events the raw stop document counts" in summary.reason
    # and a complete run says nothing of the kind
    whole = JitCallback(config=CONFIG.replace(refresh_every=4), emit=None, directory=tmp_path)
    for name, doc in raw.docs:
        whole(name, doc)
    assert whole.flush(timeout=60)
    whole.close()
    assert "did not reach" not in whole.summaries[0].reason

"""Derived runs that bluesky's own viewers handle.

A real scan (RunEngine, simulated ophyd-async beamline, JitCallback) writes
its derived run into the session catalog; the run's documents, read back from
the catalog, go into a real ``LiveTable`` and a real ``BestEffortCallback``.
"""

from __future__ import annotations

import math

import event_model
import pytest
from bluesky.callbacks import LiveTable
from bluesky.callbacks.best_effort import BestEffortCallback

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.catalog import derived_runs_for, documents, runs_container
from bluesky_jit.emit import DerivedRun
from bluesky_jit.errors import ConfigError
from bluesky_jit.worker_process import tiled_writer
from simulated_devices.beamline import hw as make_hw
from simulated_devices.plans import tomo_continuous

from .test_callbacks import ANGLES, CONFIG, source

FACILITY = {"data_session": "pass-314159", "proposal_id": "314159", "beamline_id": "28-ID-1"}


@pytest.fixture(scope="module")
def derived(local_catalog):
    """(raw start, derived run read back, its documents read back) of one real scan."""
    from .helpers import run_engine

    data_dir = local_catalog.base / "data" / "citizen"
    derived_runs = runs_container(local_catalog.client(), "derived")
    writer = tiled_writer(derived_runs, spool_dir=data_dir / "spool")
    jit = JitCallback(config=CONFIG, emit=writer, directory=data_dir / "derived")
    starts = []
    with run_engine() as RE:
        beamline = make_hw(data_dir / "raw", source=source(), frame_rate=20.0)
        RE.subscribe(jit)
        RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
        plan = tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES,
            rotations=2,
            num_darks=3,
            num_flats=3,
        )
        RE(plan, sample="bubbles", not_copied="x", **FACILITY)
    assert jit.flush(timeout=120)
    jit.close()
    assert writer.flush(timeout=60)
    (raw_start,) = starts
    (run,) = derived_runs_for(derived_runs, raw_start["uid"])
    return raw_start, run, list(documents(run))


def test_the_derived_start_carries_what_viewers_and_facilities_read(derived):
    raw_start, run, docs = derived
    start = run.metadata["start"]
    assert start["scan_id"] == raw_start["scan_id"] == start["raw_scan_id"]
    assert start["plan_name"] == "bluesky_jit"
    assert start["plan_type"] == "derived"
    assert start["hints"] == {"dimensions": [[["step"], "metrics"]]}
    for key, value in FACILITY.items():  # the default copy_keys
        assert start[key] == value
    assert "not_copied" not in start
    assert start["config"]["runtime"]["copy_keys"] == list(FACILITY)
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)


def test_every_data_key_has_units_and_the_metrics_hint_loss_and_alpha(derived):
    _, _, docs = derived
    descriptors = {d["name"]: d for n, d in docs if n == "descriptor"}
    assert {"reconstruction", "reconstruction_xz", "metrics"} <= set(descriptors)
    for name, descriptor in descriptors.items():
        for key, data_key in descriptor["data_keys"].items():
            assert "units" in data_key, (name, key)
            assert data_key["object_name"] == name
        assert set(descriptor["object_keys"][name]) == set(descriptor["data_keys"])
    for image in ("reconstruction", "reconstruction_xz"):
        assert descriptors[image]["data_keys"][image]["units"] == "1/mm"
    metrics = descriptors["metrics"]
    assert metrics["hints"] == {"metrics": {"fields": ["loss", "alpha"]}}
    assert metrics["data_keys"]["loss"]["units"] == ""
    assert metrics["data_keys"]["elapsed_s"]["units"] == "s"
    assert metrics["data_keys"]["sigma_fbp"]["units"] == "1/mm"


def test_live_table_shows_the_metrics_of_a_run_read_back(derived):
    _, run, docs = derived
    lines = []
    table = LiveTable(["step", "loss", "alpha"], stream_name="metrics", out=lines.append)
    for name, doc in docs:
        table(name, doc)
    text = "\n".join(lines)
    assert "|       loss |" in text or " loss " in text, text
    metrics = run["metrics"].read()
    for loss in metrics["loss"]:
        shown = f"{float(loss):.3f}" if math.isfinite(loss) else "nan"
        assert shown in text, (shown, text)
    assert len([line for line in lines if line.startswith("|") and "." in line]) == len(
        metrics["loss"]
    )
    # the water mark at the stop: plan_type, plan_name, uid, scan id
    assert f"derived bluesky_jit ['{run.metadata['start']['uid'][:8]}']" in text
    assert f"(scan num: {run.metadata['start']['scan_id']})" in text


def test_best_effort_callback_takes_the_whole_run(derived, capsys):
    """No plots: the heading and, from its table, the water mark (bluesky's table itself
    only follows a stream called "primary", so the metrics rows are the LiveTable's above)."""
    _, run, docs = derived
    bec = BestEffortCallback()
    bec.disable_plots()
    for name, doc in docs:
        bec(name, doc)
    out = capsys.readouterr().out
    start = run.metadata["start"]
    assert f"Transient Scan ID: {start['scan_id']}" in out
    assert f"Persistent Unique Scan ID: '{start['uid']}'" in out
    assert "New stream: 'metrics'" in out
    assert f"derived bluesky_jit ['{start['uid'][:8]}'] (scan num: {start['scan_id']})" in out


def test_best_effort_callback_plots_loss_and_alpha_against_step(derived):
    """With plots (on figures of their own, no display): one figure, the hinted fields."""
    from matplotlib.figure import Figure

    _, run, docs = derived
    figures = {}

    def figure(name):
        return figures.setdefault(name, Figure())

    bec = BestEffortCallback(fig_factory=figure)
    bec.disable_table()
    for name, doc in docs:
        bec(name, doc)
    (fig,) = figures.values()
    labels = sorted(ax.get_ylabel() for ax in fig.axes)
    assert labels == ["alpha", "loss"]
    (line,) = [ax for ax in fig.axes if ax.get_ylabel() == "loss"][0].get_lines()[:1]
    assert len(line.get_xdata()) == len(run["metrics"].read()["loss"])
    assert "step" in {ax.get_xlabel() for ax in fig.axes}


def test_copy_keys_may_not_override_what_the_derived_run_sets(tmp_path):
    for keys in (("scan_id",), "data_session"):
        with pytest.raises(ConfigError, match="copy_keys"):
            DerivedRun(
                raw_start={"uid": "abc"},
                emit=print,
                directory=tmp_path,
                image_shape=(4, 4),
                metadata={},
                copy_keys=keys,
            )

"""The profile as a queue server's startup code (bluesky-queueserver), with real processes.

Plan and device discovery loads the profile without starting anything; a plan queued
in an RE Manager (``start-re-manager`` with a ``redis-server`` of the test's own on
127.0.0.1) yields a derived run in the profile's embedded catalog, and closing the
environment leaves no process behind (no orphan ``tiled serve``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bluesky_jit.apps.session import install_profile, open_catalog
from bluesky_jit.catalog import _free_port, derived_runs_for, runs_container

from .helpers import wait_for

pytest.importorskip("bluesky_queueserver", reason="pip install -e '.[queue]'")
psutil = pytest.importorskip("psutil", reason="pip install -e '.[queue]'")
BIN = Path(sys.executable).parent
DEVICES = {"det", "rot_stage", "shutter", "sample_stage"}


@pytest.fixture
def profile_env(tmp_path, tiny_toml, monkeypatch):
    """The installed profile's startup directory; BLUESKY_JIT_* set for an embedded catalog."""
    settings = tmp_path / "settings.toml"
    settings.write_text(tiny_toml.read_text() + "[beamline]\nsize = 32\nrows = 4\n")
    monkeypatch.setenv("BLUESKY_JIT_CONFIG", str(settings))
    monkeypatch.setenv("BLUESKY_JIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BLUESKY_JIT_CATALOG", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return install_profile(tmp_path / "profile_jit").parent


def left_behind(tmp_path: Path) -> list[str]:
    """Command lines of live processes that name a path under ``tmp_path`` (``tiled serve``)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if str(tmp_path) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def test_discovery_lists_the_plans_and_devices_and_starts_nothing(profile_env, tmp_path):
    import yaml
    from bluesky_queueserver import gen_list_of_plans_and_devices

    gen_list_of_plans_and_devices(startup_dir=str(profile_env), file_dir=str(tmp_path))
    found = yaml.safe_load((tmp_path / "existing_plans_and_devices.yaml").read_text())
    assert set(found["existing_plans"]) == {"tomo", "tomo_step"}
    assert set(found["existing_devices"]) >= DEVICES
    params = {p["name"]: p for p in found["existing_plans"]["tomo"]["parameters"]}
    assert params["det"]["annotation"]["type"] == "__READABLE__"
    assert params["rot_stage"]["annotation"]["type"] == "__MOVABLE__"
    assert params["num_angles"]["default"] == "90"
    assert not (tmp_path / "data" / "catalog").exists()  # no catalog server was started
    assert left_behind(tmp_path) == []


@pytest.fixture
def redis_port(tmp_path):
    """A redis-server of this test on a free 127.0.0.1 port (no files kept)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install -y redis-server")
    port = _free_port("127.0.0.1")
    command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port), 20, "redis-server to listen")
        yield port
    finally:
        server.terminate()
        server.wait(10)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_queued_plan_yields_a_derived_run_and_leaves_no_process(
    profile_env, redis_port, tmp_path
):
    from bluesky_queueserver_api import BPlan
    from bluesky_queueserver_api.zmq import REManagerAPI

    control = f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"
    info = f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"
    command = [BIN / "start-re-manager", "--startup-dir", str(profile_env)]
    command += ["--redis-addr", f"127.0.0.1:{redis_port}", "--redis-name-prefix", "jit_test"]
    command += ["--zmq-control-addr", control, "--zmq-info-addr", info]
    log = (tmp_path / "re_manager.log").open("w")
    manager = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    RM = REManagerAPI(zmq_control_addr=control, zmq_info_addr=info)
    try:
        wait_for(lambda: _status(RM), 60, "RE Manager to answer")
        before = {p.pid for p in psutil.Process(manager.pid).children(recursive=True)}
        RM.environment_open()
        RM.wait_for_idle(timeout=120)
        assert RM.status()["worker_environment_exists"], _tail(tmp_path)
        plan = BPlan("tomo", "det", "rot_stage", "shutter", "sample_stage", num_angles=16)
        RM.item_add(plan)
        RM.queue_start()
        wait_for(lambda: RM.status()["items_in_history"] == 1, 240, "the plan to finish")
        RM.wait_for_idle(timeout=60)
        (item,) = RM.history_get()["items"]
        assert item["result"]["exit_status"] == "completed", (item["result"], _tail(tmp_path))
        (raw_uid,) = item["result"]["run_uids"]

        session = open_catalog(tmp_path / "data", create=False)  # the worker's own server
        derived = runs_container(session.client, "derived")
        wait_for(lambda: _stopped(derived, raw_uid), 120, "the derived run's stop document")
        (run,) = derived_runs_for(derived, raw_uid)
        assert run.metadata["stop"]["exit_status"] == "success"
        assert raw_uid in runs_container(session.client, "raw")

        started = {p.pid for p in psutil.Process(manager.pid).children(recursive=True)} - before
        assert any("_server_child" in " ".join(_cmdline(pid)) for pid in started)
        RM.environment_close()
        wait_for(lambda: not RM.status()["worker_environment_exists"], 120, "the env to close")
        wait_for(lambda: not any(map(_alive, started)), 30, "the worker's children to end")
    finally:
        RM.close()
        manager.terminate()
        manager.wait(60)
        log.close()
    wait_for(lambda: left_behind(tmp_path) == [], 30, "no process left under tmp_path")


def _status(RM) -> bool:
    try:
        return RM.status(reload=True)["manager_state"] == "idle"
    except Exception:  # not answering yet
        return False


def _stopped(derived, raw_uid: str) -> bool:
    runs = derived_runs_for(derived, raw_uid)
    return bool(runs) and runs[0].metadata.get("stop") is not None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "re_manager.log").read_text()[-4000:]

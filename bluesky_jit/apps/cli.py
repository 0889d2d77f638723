"""The command line: ``bluesky-jit demo | replay | listen | serve | export | spool | profile``.

Settings come from flags, then a settings file (``--config FILE``, TOML or
YAML), then the defaults: a flag always wins over the file, the file over the
default. File keys are the long flag names without dashes (``refresh_every``,
``frame_rate``; ``--no-pace`` is ``pace = false``), in sections ``[jit]``
(any :class:`~bluesky_jit.config.JitConfig` setting, flat or in tables such as
``[jit.training]``; every setting is also a flag: ``--model``, ``--device``,
``--seed``, ``--refresh-every``, ...), ``[catalog]`` (``uri`` for
``--catalog``, ``api_key``, ``data_dir``) and one per subcommand.

The flags are click options; the JitConfig flags are made from the model's
fields (name, type, choices, description, default), and a settings file
becomes click's ``default_map``, so the precedence is click's own.

Exit codes (for scripts) are :data:`EXIT_CODES`, shown by every ``--help``;
the README's table says what each means.

Ctrl-C (SIGINT) and SIGTERM stop every subcommand cleanly with exit code 130:
``demo`` aborts the scan's run (stop document ``exit_status: abort``) and
closes the callback and the embedded catalog; ``listen`` and ``serve`` finish
the current run's documents, then stop (a second Ctrl-C stops at once);
``replay`` and ``export`` stop where they are. The embedded catalog's server
runs in a process group of its own, so a terminal's Ctrl-C does not reach it
directly: the command stops it on the way out.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..config import DYNAMIC_CHOICES, SECTION_OF, SECTIONS
from ..errors import BlueskyJitError, CatalogError, ConfigError

logger = logging.getLogger("bluesky_jit.apps.cli")

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BUG = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

EXIT_CODES = """\b
exit codes:
  0 success; 1 a run failed (its derived run's exit_status is not success);
  2 bad usage or input; 3 catalog or broker unreachable (or failing);
  4 internal error (a bug); 130 interrupted (Ctrl-C or SIGTERM)
settings: flag > --config file (TOML/YAML) > default; `bluesky-jit --help` explains the file
"""

EXAMPLES = {
    "demo": """
  bluesky-jit demo
  bluesky-jit demo --rotations 2 --size 96 --summary summary.json --figures figures/
  bluesky-jit demo --photons 300 --no-pace --model unet --device cuda
  bluesky-jit demo --config bluesky-jit.toml --seed 3
  bluesky-jit demo --recording scan.h5 --center-of-rotation 295 --slice-size 256
  bluesky-jit demo --web 8080        # watch in a browser; the key: bluesky_jit_data/web_api_key
  bluesky-jit demo --live --planes all
""",
    "replay": """
  bluesky-jit replay bluesky_jit_data 3f2a9c1e            # runs of `bluesky-jit demo`
  bluesky-jit replay http://tiled:8000/api/v1/metadata/bl 3f2a9c1e 77b0 --pace realtime
  bluesky-jit replay http://tiled:8000 3f2a --raw raw --to http://other:8000 \\
      --derived-dir /shared/derived --refresh-every 5 --summary replay.json
  TILED_API_KEY=secret bluesky-jit replay http://tiled:8000 3f2a --root-map /old=/new
""",
    "listen": """
  bluesky-0MQ-proxy --in-address 127.0.0.1:5577 --out-address 127.0.0.1:5578 &
  bluesky-jit listen --zmq 127.0.0.1:5578                 # embedded catalog in ./bluesky_jit_data
  bluesky-jit listen --zmq beamline:5578 --catalog http://tiled:8000 --api-key-file ~/.tiled-key
  bluesky-jit listen --kafka broker1:9092,broker2:9092 \\
      --topic bl.bluesky.runengine.documents --group bluesky-jit --device cuda
  bluesky-jit listen --config bluesky-jit.toml --max-runs 1 --live
""",
    "serve": """
  bluesky-jit serve                                        # ./bluesky_jit_data, free port
  bluesky-jit serve --data-dir /data/jit --port 8000 --readable /data/detector
  then: bluesky-jit replay /data/jit UID   (finds the running server)
""",
    "spool": """
  bluesky-jit spool                                        # ./bluesky_jit_data/spool -> its catalog
  bluesky-jit spool --data-dir /data/jit --catalog http://tiled:8000
""",
    "export": """
  bluesky-jit export bluesky_jit_data 3f2a9c1e --out slices.gif
  bluesky-jit export bluesky_jit_data 3f2a9c1e --out slices.tif        # derived: tiff, hdf5
  bluesky-jit export bluesky_jit_data 7e119ef9 --out scan.nxs          # raw: nxtomo, dxchange
  bluesky-jit export bluesky_jit_data 7e119ef9 --format dxchange --out scan.h5
  bluesky-jit export http://tiled:8000 3f2a9c1e --out report/slices.png --api-key-file ~/.tiled-key
""",
}

DESCRIPTION = """Live just-in-time denoising of tomography scans (a Bluesky plugin).

Settings file (--config FILE.toml or FILE.yaml), e.g.:

\b
  [jit]                 # any JitConfig setting (flat, or in [jit.training] etc.)
  model = "unet"
  refresh_every = 10
  [jit.training]
  learning_rate = 0.001
  [catalog]
  uri = "http://tiled.example.org:8000"   # omit for the embedded catalog
  data_dir = "bluesky_jit_data"
  [listen]
  kafka = "broker1:9092"
  topic = ["bl.bluesky.runengine.documents"]
  group = "bluesky-jit"

A flag wins over the file, the file over the default.
"""

CATALOG_KEYS = {"catalog_uri": "uri", "api_key": "api_key", "data_dir": "data_dir"}
"""Options read from the file's [catalog] section (option name -> key there)."""
HTTP_LOGGERS = ("httpx", "httpcore")
"""Loggers of the HTTP clients (tiled's): INFO has a line per request, kept for ``-vv``."""
EXTRA_KEYS = {"listen": {"consumer_config"}}
"""File keys of a subcommand's section that are no flag (Kafka consumer settings)."""
PRESETS = {"variant", "dynamic"}
"""Flags (and [jit] keys) that stand for several JitConfig settings at once (session.jit_config)."""


# ------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Invocation:
    """What the command line asks for: a subcommand, its values and the settings file."""

    command: str
    values: dict[str, Any]
    settings: Mapping[str, Mapping[str, Any]]
    verbose: int = 0

    def jit_config(self) -> Any:
        """The JitConfig: the flags over the file's ``[jit]`` section over the defaults."""
        from .session import jit_config

        section = dict(self.settings.get("jit", {}))
        given = {
            k: v for k, v in self.values.items() if k in {*SECTION_OF, *PRESETS} and v is not None
        }
        if "variant" in given:  # the flag names the network
            section.pop("model", None)
        config = jit_config(section, **given)
        config.check_here()  # a device or a checkpoint not on this machine: exit 2, no scan
        return config


def _load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """Eager ``--config``: read the file, check its keys and types, make it click's defaults."""
    from .session import load_settings

    settings = load_settings(path)
    ctx.meta["settings"] = settings
    command = ctx.command.name
    known = {p.name for p in ctx.command.params if p.name not in CATALOG_KEYS}
    known |= EXTRA_KEYS.get(command, set())
    unknown = sorted(set(settings.get(command, {})) - known)
    if unknown:
        raise ConfigError(
            f"Unknown setting(s) {unknown} in section [{command}] of {path}; known: "
            f"{sorted(known - set(SECTION_OF) - {*PRESETS, 'config', 'verbose'})}."
        )
    defaults = {}
    for p in ctx.command.params:
        if p.name in {*SECTION_OF, *PRESETS} or not isinstance(p, click.Option):
            continue  # JitConfig settings: Invocation.jit_config
        section, key = command, p.name
        if p.name in CATALOG_KEYS:
            section, key = "catalog", CATALOG_KEYS[p.name]
        if key not in settings.get(section, {}):
            continue
        value = settings[section][key]
        if p.multiple and isinstance(value, str):
            value = [value]
        try:
            defaults[p.name] = p.type_cast_value(ctx, value)
        except click.BadParameter as err:
            raise ConfigError(
                f"Setting {key} in [{section}] of {path} has the wrong type: {err.message}."
            ) from err
    ctx.default_map = defaults
    return path


def _jit_options(f: Callable) -> Callable:
    """A flag per :class:`~bluesky_jit.config.JitConfig` setting, made from its field."""
    for section in reversed(SECTIONS.values()):
        for name, info in reversed(section.__pydantic_fields__.items()):
            kind = _scalar(info.annotation)
            if kind is None:
                continue  # model_config: a table, in the settings file only
            flag = "--" + name.replace("_", "-")
            default = info.get_default(call_default_factory=True)
            shown = "" if default is None else f"  [default: {default}]"
            if kind is bool:
                decls, extra = [f"{flag}/--no-{flag[2:]}", name], {}
            elif typing.get_origin(kind) is typing.Literal:
                decls, extra = [flag, name], {"type": click.Choice(typing.get_args(kind))}
            else:
                decls, extra = [flag, name], {"type": kind}
            f = click.option(
                *decls, default=None, show_default=False, help=f"{info.description}{shown}", **extra
            )(f)
    f = click.option(
        "--dynamic",
        "dynamic",
        type=click.Choice(DYNAMIC_CHOICES),
        is_flag=False,
        flag_value="normal",
        default=None,
        help="settings for a sample that changes during the scan (JitConfig.for_dynamic); "
        "low: for noisy frames, a few hundred photons per pixel; off: none. Flags still win",
    )(f)
    return click.option(
        "--variant",
        default=None,
        help="network of Graas et al. 2023 instead of --model: Z3, T3, ...",
    )(f)


def _scalar(annotation: Any) -> Any:
    """int, float, str, bool or a Literal, without None; None for anything else."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float, str, bool) or typing.get_origin(annotation) is typing.Literal:
        return annotation
    return None


VERBOSE = click.option("-v", "--verbose", count=True, show_default=False, help="more log output")


def _command(name: str, summary: str, *options: Callable) -> Callable:
    """A subcommand with its options, ``--config`` and ``-v``; it returns an Invocation."""

    def decorate(f: Callable[[Invocation], int]) -> Callable[[Invocation], int]:
        def callback(**values: Any) -> Invocation:
            ctx = click.get_current_context()
            values.pop("config")
            verbose = ctx.meta.get("verbose", 0) + values.pop("verbose")
            return Invocation(name, values, ctx.meta["settings"], verbose)

        for option in reversed(options):
            callback = option(callback)
        callback = VERBOSE(callback)
        callback = click.option(
            "--config",
            type=click.Path(path_type=Path, dir_okay=False),
            is_eager=True,
            expose_value=True,
            callback=_load_config,
            metavar="FILE",
            help="settings file (.toml, .yaml); flags win over it",
        )(callback)
        epilog = "\b\nexamples:" + EXAMPLES[name] + "\n" + EXIT_CODES
        command = click.command(name, help=summary, short_help=summary, epilog=epilog)(callback)
        HANDLERS[name] = f
        cli.add_command(command)
        return f

    return decorate


@click.group(
    help=DESCRIPTION,
    epilog=EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@VERBOSE
@click.version_option(
    __version__, "--version", prog_name="bluesky-jit", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    ctx.meta["verbose"] = verbose


opt = click.option


def _key_file(ctx: click.Context, param: click.Parameter, value: Any) -> str | None:
    """``--api-key-file FILE``: the key from a file only its owner may read.

    A key given as a flag would be readable by every local user (``ps``), so
    keys come from such a file, the ``TILED_API_KEY`` variable or the settings
    file's ``[catalog] api_key``.
    """
    from click.core import ParameterSource

    if value is None or ctx.get_parameter_source(param.name) == ParameterSource.DEFAULT_MAP:
        return value  # from the settings file: the key itself
    path = Path(value)
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"Cannot read the API key file {path}: {err.strerror or err}.") from err
    if mode & 0o077:
        raise ConfigError(
            f"The API key file {path} may be read by other users (mode {mode & 0o777:o}); "
            f"expected only its owner: run chmod 600 {path}."
        )
    if not key:
        raise ConfigError(f"The API key file {path} is empty; expected the key on one line.")
    return key


def _no_key_in_argv(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None:
        raise ConfigError(
            "--api-key is not taken on the command line: every local user can read it there "
            "(ps, /proc). Put the key in a file only you can read and pass --api-key-file "
            "FILE, or set TILED_API_KEY."
        )


def key_options(help_text: str) -> tuple:
    """``--api-key-file FILE`` (the key, into ``api_key``) and the refused ``--api-key``."""
    return (
        opt("--api-key-file", "api_key", metavar="FILE", callback=_key_file, help=help_text),
        opt("--api-key", "api_key_argv", hidden=True, expose_value=False, callback=_no_key_in_argv),
    )


PathType = click.Path(path_type=Path)


def on_switch(name: str, help_text: str) -> Callable:
    """An on/off flag, off by default."""
    return opt(name, is_flag=True, show_default=False, help=help_text)


def off_switch(name: str, value_name: str, help_text: str) -> Callable:
    """``--no-thing``: sets ``value_name`` (True by default) to False."""
    return opt(name, value_name, is_flag=True, flag_value=False, default=True,
               show_default=False, help=help_text)  # fmt: skip


def data_dir_option(help_text: str) -> Callable:
    """``--data-dir DIR``, ``bluesky_jit_data`` by default."""
    return opt("--data-dir", type=PathType, default=Path("bluesky_jit_data"), help=help_text)


CATALOG = (
    opt("--catalog", "catalog_uri", metavar="URI",
        help="write to this Tiled server (http://host:port[/path]) instead of the embedded "
        "catalog"),
    *key_options("file holding the API key of --catalog (or TILED_API_KEY)"),
    data_dir_option("embedded catalog, detector and derived files"),
)  # fmt: skip
PROGRESS = off_switch("--no-progress", "progress", "no progress bar")
LIVE = (
    on_switch("--live", "show a live figure"),
    opt("--planes", type=click.Choice(["xy", "xz", "yz", "all"]), default="xy",
        help="slices in the live figure: axial xy, vertical xz or yz, or all three"),
)  # fmt: skip
WEB = (
    opt("--web", "web_port", type=int, metavar="PORT",
        help="serve the live web view on PORT (0: a free one); the page asks for the "
        "catalog's API key"),
    opt("--web-host", default="127.0.0.1", help="web view interface (0.0.0.0: other machines)"),
)  # fmt: skip


HANDLERS: dict[str, Callable[[Invocation], int]] = {}


# ----------------------------------------------------------------------------- main
def _quiet_http(verbose: int) -> None:
    """``-v`` shows bluesky-jit's INFO lines, not one per HTTP request; ``-vv`` shows those too."""
    level = logging.NOTSET if verbose >= 2 else logging.WARNING
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(level)


def parse(argv: Sequence[str] | None = None) -> Invocation | int:
    """The Invocation of ``argv``, or an exit code (``--help``: 0; bad usage: 2)."""
    try:
        result = cli.main(args=argv, prog_name="bluesky-jit", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return EXIT_USAGE if isinstance(error, click.UsageError) else error.exit_code
    return result if isinstance(result, Invocation) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    from ..errors import BrokerError

    restore = _terminate_as_interrupt()
    try:
        invocation = parse(argv)
        if isinstance(invocation, int):
            return invocation
        logging.basicConfig(
            level=logging.WARNING - 10 * invocation.verbose,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        _quiet_http(invocation.verbose)
        return HANDLERS[invocation.command](invocation)
    except (CatalogError, BrokerError) as error:
        _log(f"error: {error}")
        return EXIT_UNREACHABLE
    except BlueskyJitError as error:
        _log(f"error: {error}")
        return EXIT_USAGE
    except (KeyboardInterrupt, click.Abort) as interrupt:
        detail = f": {interrupt}" if str(interrupt) else ""
        print(f"bluesky-jit: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - mapped to an exit code scripts can trust
        import httpx

        if isinstance(error, httpx.HTTPError):
            _log(
                f"error: the catalog answered with an error: {error}. See the Tiled server's "
                "log (for the embedded catalog: DATA_DIR/catalog/tiled_server.log)."
            )
            return EXIT_UNREACHABLE
        import traceback

        traceback.print_exc()
        _log(f"error: unexpected {type(error).__name__} (a bug in bluesky-jit): {error}")
        return EXIT_BUG
    finally:
        restore()


# ------------------------------------------------------------------------ subcommands
# Each handler gets the Invocation; its values are named as the options (and file keys).
DEMO = (
    *CATALOG,
    opt("--size", default=128, help="detector width = slice size (px)"),
    opt("--rows", default=16, help="detector rows"),
    opt("--angles", default=90, type=click.IntRange(min=2),
        help="projections per rotation (180 degrees)"),
    opt("--rotations", default=3, help="rotations"),
    opt("--photons", default=1000.0, help="flat-field counts per pixel"),
    opt("--frame-rate", default=15.0, help="virtual frames per second"),
    off_switch("--no-pace", "pace", "acquire as fast as possible instead of at --frame-rate"),
    opt("--recording", type=PathType, metavar="FILE.h5",
        help="replay this DXchange scan (/exchange/data, data_white, data_dark, theta) in "
        "acquisition order instead of the simulated one (--size ... --photons unused)"),
    opt("--center-of-rotation", type=float,
        help="with --recording: axis column (px; default middle)"),
    _jit_options,
    opt("--summary", type=PathType, help="write the summary as JSON"),
    opt("--figures", type=PathType, help="write PNG figures here"),
    PROGRESS,
    *LIVE,
    *WEB,
)  # fmt: skip
REPLAY = (
    click.argument("catalog"),
    click.argument("uids", nargs=-1, required=True, metavar="UID..."),
    *key_options("file holding the API key of CATALOG (or TILED_API_KEY)"),
    opt("--raw", default="raw", metavar="NAME", help="container of the raw runs in CATALOG"),
    opt("--to", metavar="CATALOG",
        help="write derived runs to this catalog (URI or data dir; default: CATALOG)"),
    opt("--derived", default="derived", metavar="NAME", help="container of the derived runs"),
    opt("--derived-dir", type=PathType,
        help="derived HDF5 files (readable by the target server; default DATA_DIR/derived)"),
    data_dir_option("for a URI catalog: where derived files go (DATA_DIR/derived)"),
    opt("--pace", type=click.Choice(["fast", "realtime"]), default="fast", help="fast or realtime"),
    opt("--speed", default=1.0, help="realtime only: speed-up factor"),
    opt("--root-map", multiple=True, metavar="OLD=NEW",
        help="read detector files from NEW where they were under OLD (repeatable)"),
    _jit_options,
    opt("--summary", type=PathType, help="write the summaries as JSON"),
    PROGRESS,
    *LIVE,
)  # fmt: skip
LISTEN = (
    opt("--zmq", metavar="HOST:PORT", help="out-address of a bluesky 0MQ proxy"),
    opt("--zmq-format", type=click.Choice(["msgpack", "pickle"]), default="msgpack",
        help="how the RunEngine side encodes 0MQ messages: msgpack (Publisher(..., "
        "serializer=bluesky_jit.apps.listen.zmq_serializer())); pickle runs code from "
        "whoever can reach the proxy: only on a closed bus"),
    opt("--curve-secret-key", type=PathType,
        help="CURVE: this listener's certificate file with its secret key (zmq.auth)"),
    opt("--curve-server-key", type=PathType, help="CURVE: the 0MQ proxy's public certificate"),
    opt("--kafka", metavar="BOOTSTRAP", help="Kafka bootstrap servers"),
    opt("--topic", multiple=True, help="Kafka topic (repeatable)"),
    opt("--group", default="bluesky-jit", help="Kafka consumer group id"),
    *CATALOG,
    on_switch("--write-raw", "also store the raw runs (container 'raw')"),
    opt("--run-timeout", default=600.0, help="close a run silent this long (s) as aborted"),
    opt("--connect-timeout", default=5.0, help="seconds to wait for the broker at start-up"),
    opt("--max-runs", type=int, help="exit after this many derived runs"),
    on_switch("--skip-done", "skip runs that already have a successful derived run with "
              "these settings (always on with --kafka)"),
    _jit_options,
    *LIVE,
    *WEB,
)  # fmt: skip
SERVE = (
    data_dir_option("catalog in DATA_DIR/catalog; files below DATA_DIR readable"),
    opt("--host", default="127.0.0.1", help="interface to bind"),
    opt("--port", type=int, help="TCP port (default: a free one)"),
    *key_options("file holding the API key clients must send (default: a random one)"),
    opt("--readable", multiple=True, type=PathType,
        help="more directories the server may read (detector files; repeatable)"),
)  # fmt: skip
EXPORT = (
    click.argument("catalog"),
    click.argument("uid"),
    opt("--out", type=PathType, default=Path("slices.gif"), help="output file"),
    opt("--format", type=click.Choice(["nxtomo", "dxchange", "tiff", "hdf5", "png", "gif"]),
        help="raw run: nxtomo, dxchange; derived run: tiff, hdf5 (NXdata), png, gif "
        "(default: from the suffix of --out: .nxs .tif .png .gif)"),
    *key_options("file holding the API key of CATALOG (or TILED_API_KEY)"),
    opt("--fps", default=4.0, help="GIF frames per second"),
)  # fmt: skip
SPOOL = (
    *CATALOG,
    opt("--timeout", default=120.0, help="seconds to wait for the catalog to take every run"),
)
COMMANDS = {
    "demo": "simulated dynamic scan with live denoising into an embedded Tiled catalog",
    "replay": "replay stored runs from a catalog through the callback; derived runs linked to them",
    "listen": "process runs arriving over 0MQ or Kafka, for as long as it runs",
    "serve": "run the embedded catalog (Tiled, SQLite + files) for other tools to read",
    "export": "write a raw run as NXtomo or DXchange, a derived run's slices as TIFF, NXdata, "
    "PNG or GIF",
    "spool": "write runs left in the spool (a catalog outage, a process that died) to the catalog",
}


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


# ----------------------------------------------------------------------------- demo
@_command("demo", COMMANDS["demo"], *DEMO)
def _demo(call: Invocation) -> int:
    from .demo import DemoOptions, format_summary

    v, config = call.values, call.jit_config()
    web_key = _web_key(v)
    options = DemoOptions(
        data_dir=v["data_dir"],
        catalog_uri=v["catalog_uri"],
        api_key=v["api_key"] or web_key,
        size=v["size"],
        rows=v["rows"],
        num_angles=v["angles"],
        rotations=v["rotations"],
        photons=v["photons"],
        frame_rate=v["frame_rate"],
        paced=v["pace"],
        seed=config.runtime.seed,
        recording=v["recording"],
        center_of_rotation=v["center_of_rotation"],
        summary=v["summary"],
        figures=v["figures"],
        progress=v["progress"],
        config=config,
    )
    jit_box: list[Any] = []
    views: list[Any] = []

    def got_callback(jit: Any) -> None:
        jit_box.append(jit)
        if web_key is not None:
            views.append(_serve_web(v, web_key, jit))

    options.on_callback = got_callback
    try:
        result = _run_demo(options, v, jit_box)
    finally:
        for view in views:
            view.stop()
    print(format_summary(result))
    return EXIT_OK if result["exit_status"] == "success" else EXIT_RUN_FAILED


def _run_demo(options: Any, v: Mapping[str, Any], jit_box: list[Any]) -> dict[str, Any]:
    """The demo, with a live figure in this thread (--live) or without."""
    from .demo import run_demo

    if v["live"]:
        re_box: list[Any] = []
        options.on_run_engine = re_box.append

        def pause() -> bool:  # Ctrl-C reaches the main thread; the scan runs in another
            if not re_box or re_box[0].state != "running":
                return False
            try:
                re_box[0].request_pause(defer=False)
            except Exception:  # noqa: BLE001 - it stopped meanwhile
                return False
            return True

        return _with_live_view(
            lambda: run_demo(options), jit_box, on_interrupt=pause, planes=v["planes"]
        )
    return run_demo(options)


def _web_key(v: Mapping[str, Any]) -> str | None:
    """The key of ``--web`` (None without it): the catalog's (``--api-key-file``,
    ``TILED_API_KEY``); with neither, a new one, written to ``DATA_DIR/web_api_key``
    (mode 0600, never printed) and given to the embedded catalog too."""
    import os
    import secrets

    if v["web_port"] is None:
        return None
    key = v["api_key"] or os.environ.get("TILED_API_KEY")
    if key:
        return key
    if v["catalog_uri"] is not None:
        raise ConfigError(
            "--web needs the catalog's API key for its page: pass --api-key-file FILE or set "
            "TILED_API_KEY."
        )
    path = Path(v["data_dir"]) / "web_api_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    key = secrets.token_hex(16)
    path.write_text(key + "\n")
    _log(f"the web view's API key (the embedded catalog's too) is in {path}")
    return key


def _serve_web(v: Mapping[str, Any], key: str, jit: Any) -> Any:
    """Start the web view of ``--web PORT`` on ``jit``."""
    from .web import WebView

    view = WebView(jit, api_key=key, host=v["web_host"], port=v["web_port"]).start()
    _log(f"live web view on {view.url} (it asks for the catalog's API key)", stdout=True)
    return view


# --------------------------------------------------------------------------- replay
def _root_map(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--root-map takes OLD=NEW (two paths); got {pair!r}.")
        out[old] = new
    return out


@_command("replay", COMMANDS["replay"], *REPLAY)
def _replay(call: Invocation) -> int:
    from .replay import replay
    from .session import open_catalog

    v, config = call.values, call.jit_config()
    root_map = _root_map(v["root_map"])
    catalog = functools.partial(open_catalog, api_key=v["api_key"], data_dir=v["data_dir"])
    with catalog(v["catalog"], create=False) as src:
        target = src if v["to"] is None else catalog(v["to"])
        try:
            directory = Path(v["derived_dir"] or target.data_dir / "derived")
            derived = target.runs(v["derived"])
            if v["raw"] not in src.client:
                raise CatalogError(
                    f"{src.uri} has no container {v['raw']!r} of raw runs; it has "
                    f"{list(src.client)[:10]}. Pass --raw NAME."
                )
            raw = src.client[v["raw"]]
            _log(f"replaying {len(v['uids'])} run(s) from {raw.uri}")
            jit_box: list[Any] = []
            work = functools.partial(
                replay, raw, list(v["uids"]), derived_runs=derived, directory=directory,
                config=config, pace=v["pace"], speed=v["speed"], root_map=root_map,
                progress=v["progress"], on_callback=jit_box.append,
            )  # fmt: skip
            live = v["live"]
            summaries = _with_live_view(work, jit_box, planes=v["planes"]) if live else work()
            for s in summaries:
                line = _run_line(s, counts=True)
                _log(f"{line} in {derived.uri}, files in {directory}", stdout=True)
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
    planes: str = "xy",
) -> Any:
    """Run ``work`` in a thread and a live figure of ``planes`` in this one; return its result.

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
                view = LiveView(jit_box[0], planes=planes)
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
@_command("listen", COMMANDS["listen"], *LISTEN)
def _listen(call: Invocation) -> int:
    from .listen import (
        KafkaSource,
        Listener,
        check_kafka,
        check_reachable,
        kafka_consumer_config,
        listen_zmq,
        parse_address,
    )
    from .session import open_catalog

    v = call.values
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
    config = call.jit_config()
    consumer_config = {}
    if v["kafka"] is not None:  # settings file, then BLUESKY_JIT_KAFKA_* variables
        consumer_config = kafka_consumer_config(
            call.settings.get("listen", {}).get("consumer_config")
        )
    timeout = v["connect_timeout"]
    if v["zmq"] is not None:  # fail fast, before starting a catalog
        address = parse_address(v["zmq"], "0MQ proxy address")
        check_reachable(*address, "0MQ proxy (out-port)", timeout=timeout)
    else:
        check_kafka(v["kafka"], list(v["topic"]), consumer_config=consumer_config, timeout=timeout)
    stop = threading.Event()
    signals = _on_signals(stop)
    web_key = _web_key(v)
    key = v["api_key"] or web_key
    with open_catalog(v["catalog_uri"], api_key=key, data_dir=v["data_dir"]) as session:
        derived_uri = session.runs("derived").uri

        def report(summary: Any) -> None:
            if summary.derived_uid is not None:
                _log(f"{_run_line(summary)} in {derived_uri}", stdout=True)

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
        view = None
        try:
            if v["zmq"] is not None:
                source = f"0MQ proxy {v['zmq']}"
                work = functools.partial(
                    listen_zmq, v["zmq"], listener, stop=stop, check=False,
                    zmq_format=v["zmq_format"], curve_secret_key=v["curve_secret_key"],
                    curve_server_key=v["curve_server_key"],
                )  # fmt: skip
            else:
                source = f"Kafka {v['kafka']} topics {v['topic']} group {v['group']!r}"
                kafka = KafkaSource(
                    listener, bootstrap_servers=v["kafka"], topics=list(v["topic"]),
                    group_id=v["group"], consumer_config=consumer_config,
                )  # fmt: skip
                work = functools.partial(kafka.run, stop)
            ready = functools.partial(_log, f"listening to {source}; {where}", stdout=True)
            work = functools.partial(work, on_ready=ready)
            if web_key is not None:
                view = _serve_web(v, web_key, listener.jit)
            if v["live"]:
                _with_live_view(work, [listener.jit], planes=v["planes"])
            else:
                work()
        finally:
            if view is not None:
                view.stop()
            listener.close()
    _log(f"stopped; {listener.derived_count} derived run(s), {listener.failed_count} failed")
    if signals:
        return EXIT_INTERRUPTED
    return EXIT_RUN_FAILED if listener.failed_count else EXIT_OK


def _on_signals(
    stop: threading.Event, message: str = "stopping (finishing the current run's documents)"
) -> list[int]:
    """SIGINT/SIGTERM ask for a clean stop (``message`` says what it does); a second
    SIGINT interrupts at once.

    Returns the list the signals received are appended to (empty: none came).
    ``main`` puts the previous handlers back when the command ends.
    """
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C")
        received.append(signum)
        _log(message)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return received


# ---------------------------------------------------------------------------- serve
@_command("serve", COMMANDS["serve"], *SERVE)
def _serve(call: Invocation) -> int:
    from ..catalog import LocalCatalog
    from .session import CONNECTION_FILE, write_connection_file

    v = call.values
    data_dir = Path(v["data_dir"]).resolve()
    readable = [data_dir, *(Path(p) for p in v["readable"])]
    stop = threading.Event()
    signals = _on_signals(stop, "stopping the catalog server (clients lose their connection)")
    local = LocalCatalog(
        data_dir / "catalog", host=v["host"], port=v["port"], api_key=v["api_key"],
        readable_storage=readable,
    )  # fmt: skip
    connection = local.directory / CONNECTION_FILE
    if v["host"] not in ("127.0.0.1", "localhost", "::1"):
        _log(
            f"the catalog listens on {v['host']}: it is reachable from the network, by anyone "
            "who has the API key. Serve on 127.0.0.1 unless other machines must write to it."
        )
    try:
        write_connection_file(local)
        _log(f"serving the catalog in {data_dir} at {local.uri}", stdout=True)
        # The key itself is never printed (terminals and logs are read by others): it is in
        # the connection file, readable by this user only, which other commands find.
        _log(f"API key in {connection} (mode 0600)", stdout=True)
        _log(
            f"python: tiled.client.from_uri({local.uri!r}, api_key=...)  "
            f"| bluesky-jit replay {data_dir} UID",
            stdout=True,
        )
        while not stop.wait(1.0):
            if not local.running:
                raise CatalogError(f"The Tiled server stopped unexpectedly; see {local.log_path}.")
    finally:
        connection.unlink(missing_ok=True)
        local.close()
    return EXIT_INTERRUPTED if signals else EXIT_OK


# --------------------------------------------------------------------------- export
@_command("export", COMMANDS["export"], *EXPORT)
def _export(call: Invocation) -> int:
    from .export import export_uid
    from .session import open_catalog

    v = call.values
    with open_catalog(v["catalog"], api_key=v["api_key"], create=False) as session:
        written = export_uid(session.client, v["uid"], v["out"], format=v["format"], fps=v["fps"])
    _log(written, stdout=True)
    return EXIT_OK


# ---------------------------------------------------------------------------- spool
@_command("spool", COMMANDS["spool"], *SPOOL)
def _spool(call: Invocation) -> int:
    """Write what ``DATA_DIR/spool/{raw,derived}`` holds into the catalog's containers."""
    from ..writer import SUFFIX, flush_spool
    from .session import open_catalog

    v = call.values
    with open_catalog(v["catalog_uri"], api_key=v["api_key"], data_dir=v["data_dir"]) as session:
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


# -------------------------------------------------------------------------- profile
@cli.group("profile", help="the IPython profile, also a queue server's startup code")
def _profile() -> None:
    pass


@_profile.command(
    "install",
    help="write the profile into DIR/startup (IPython, queue server)",
    epilog="\b\nexamples:\n  bluesky-jit profile install ~/.ipython/profile_jit\n"
    "  ipython --profile=jit\n  start-re-manager --startup-dir ~/.ipython/profile_jit/startup",
)
@click.argument("directory", type=PathType)
@opt("--force", is_flag=True, help="replace a startup file that differs")
def _profile_install(directory: Path, force: bool) -> Invocation:
    return Invocation("profile install", {"directory": directory, "force": force}, {})


def _install(call: Invocation) -> int:
    from .session import install_profile

    path = install_profile(call.values["directory"], force=call.values["force"])
    _log(f"profile startup file {path}; run: ipython --profile-dir={path.parents[1]}", stdout=True)
    return EXIT_OK


HANDLERS["profile install"] = _install


# ---------------------------------------------------------------------------- utils
def _log(message: str, *, stdout: bool = False) -> None:
    """A line for the user: stdout for results, stderr for progress."""
    print(f"bluesky-jit: {message}", file=sys.stdout if stdout else sys.stderr, flush=True)


def _run_line(summary: Any, *, counts: bool = False) -> str:
    """``run RAW -> derived run DERIVED (status: reason; N slices, M training steps)``."""
    why = f": {summary.reason}" if summary.reason else ""
    if counts:
        why += f"; {summary.slices} slices, {summary.train_steps} training steps"
    return (
        f"run {summary.raw_uid} -> derived run {summary.derived_uid} ({summary.exit_status}{why})"
    )


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())

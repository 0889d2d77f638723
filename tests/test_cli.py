"""The command line (bluesky_jit.apps.cli): help, settings precedence, exit codes, each subcommand.

Most tests call ``main(argv)`` in this process against the session's real Tiled server
(conftest ``jit_catalog``); ``serve`` runs as a subprocess. The ``demo`` subcommand is
exercised by the conftest ``demo_run`` fixture (tiny scan, settings file).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bluesky_jit.apps.cli import COMMANDS, main, parse
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.errors import ConfigError

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_with_examples_and_exit_codes(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bluesky-jit {command}" in out
    assert "exit codes:" in out and "3 catalog or broker unreachable" in out
    assert "--config FILE" in out


def test_top_level_help_explains_the_settings_file(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "[jit]" in out and "A flag wins over the file" in out


def test_demo_keeps_its_flags(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--data-dir --catalog --api-key-file --size --rows --angles --rotations --photons "
        "--frame-rate --no-pace --seed --model --device --refresh-every --summary --figures "
        "--no-progress"
    ).split():
        assert flag in out


# ------------------------------------------------------------------------- settings
TOML = """\
[jit]
refresh_every = 7
seed = 3
batch_size = 8
buffer_capacity = 64
[demo]
size = 48
pace = false
[catalog]
data_dir = "from-file"
"""
YAML = """\
jit:
  refresh_every: 7
  seed: 3
  batch_size: 8
  buffer_capacity: 64
demo:
  size: 48
  pace: false
catalog:
  data_dir: from-file
"""


@pytest.mark.parametrize("suffix,text", [(".toml", TOML), (".yaml", YAML)])
def test_flag_beats_file_beats_default(tmp_path, suffix, text):
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    call = parse(["demo", "--config", str(path), "--refresh-every", "5", "--rows", "8"])
    values = call.values
    assert values["rows"] == 8  # flag over default
    assert values["size"] == 48  # file over default
    assert values["pace"] is False  # `--no-pace` is `pace = false` in the file
    assert values["data_dir"] == Path("from-file")
    assert values["angles"] == 90  # default
    config = call.jit_config()
    assert config.reconstruction.refresh_every == 5  # flag over file
    assert (config.runtime.seed, config.training.batch_size) == (3, 8)  # file over default
    assert config.training.model == "unet"  # default


def test_nested_jit_tables_and_every_setting_as_a_flag(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("[jit.training]\nlearning_rate = 0.01\n[jit.runtime]\nseed = 4\n")
    argv = ["demo", "--config", str(path), "--seed", "5", "--no-augment", "--stack", "z"]
    config = parse([*argv, "--model", "unet3d"]).jit_config()
    assert (config.training.learning_rate, config.runtime.seed) == (0.01, 5)
    assert (config.training.augment, config.pairs.stack) == (False, "z")
    assert parse(["demo", "--n2i-strategy", "2:1"]) == 2  # a choice of the model's Literal


def test_a_variant_names_the_network_from_the_flag_or_the_file(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[jit]\nvariant = "T3"\nsplits = 3\n')
    config = parse(["demo", "--config", str(path)]).jit_config()
    t, p = config.training, config.pairs
    assert (t.model, p.stack, config.frames, p.splits) == ("unet3d", "t", 3, 3)
    config = parse(["demo", "--config", str(path), "--variant", "C16"]).jit_config()
    t, p = config.training, config.pairs
    assert (t.model, t.model_config, p.stack) == ("unet", {"features": 16}, None)


def test_dynamic_from_the_flag_or_the_file_with_the_flags_winning(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[jit]\ndynamic = "low"\nbatch_size = 8\n')
    config = parse(["demo", "--config", str(path), "--neighbourhood-rows", "1"]).jit_config()
    p, t = config.pairs, config.training
    assert (p.patch_size, t.batch_size, p.neighbourhood_rows) == (40, 8, 1)
    config = parse(["demo", "--config", str(path), "--dynamic", "off"]).jit_config()
    assert (config.pairs.patch_size, config.training.batch_size) == (20, 8)
    config = parse(["demo", "--dynamic"]).jit_config()  # no value: normal
    assert (config.pairs.neighbourhood_rows, config.pairs.patch_size) == (4, 20)
    with pytest.raises(ConfigError, match="both choose settings"):
        parse(["demo", "--dynamic", "low", "--variant", "T3"]).jit_config()
    path.write_text("[jit]\ndynamic = true\n")
    with pytest.raises(ConfigError, match=r"dynamic must be one of \['off', 'normal', 'low'\]"):
        parse(["demo", "--config", str(path)]).jit_config()
    assert parse(["demo", "--dynamic", "high"]) == 2  # not a choice: click's usage error


@pytest.mark.parametrize(
    "text,message",
    [
        ("[nonsense]\na = 1\n", "Unknown section 'nonsense'"),
        ("[demo]\nsizee = 3\n", "Unknown setting(s) ['sizee'] in section [demo]"),
        ("[demo]\nsize = 'big'\n", "Setting size in [demo]"),
        ("[jit]\nno_such_setting = 1\n", "Unknown JitConfig setting"),
        ("[jit]\nbatch_size = 0\n", "batch_size must be a positive integer"),
        ("[demo\n", "is not valid toml"),
    ],
)
def test_a_bad_settings_file_exits_2_with_a_clear_message(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["demo", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_settings_file_and_bad_usage_exit_2(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "Cannot read the settings file" in capsys.readouterr().err
    assert main(["replay", "--pace", "slow", "somewhere", "uid"]) == 2
    assert main(["listen"]) == 2
    assert "exactly one source" in capsys.readouterr().err
    assert main(["listen", "--zmq", "h:1", "--kafka", "k:9092"]) == 2
    assert main(["listen", "--kafka", "k:9092", "--topic", "t", "--write-raw"]) == 2
    assert "--write-raw cannot be used with --kafka" in capsys.readouterr().err


# --------------------------------------------------------------------------- replay
@pytest.mark.slow
def test_replay_command_writes_a_derived_run_linked_to_the_raw_run(
    jit_catalog, demo_run, tiny_toml, tmp_path, capsys
):
    summary = tmp_path / "replay.json"
    code = main(
        [
            "replay",
            jit_catalog.uri,
            demo_run["raw_uid"][:8],
            "--api-key-file",
            key_file(jit_catalog),
            "--data-dir",
            str(jit_catalog.base / "cli"),
            "--config",
            str(tiny_toml),
            "--refresh-every",
            "16",
            "--summary",
            str(summary),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    (result,) = json.loads(summary.read_text())
    assert f"-> derived run {result['derived_uid']} (success" in out
    assert f"{jit_catalog.uri}/api/v1/metadata/derived" in out  # where it went
    run = runs_container(jit_catalog.client(), "derived")[result["derived_uid"]]
    start = run.metadata["start"]
    assert start["raw_uid"] == demo_run["raw_uid"]
    assert start["config"]["reconstruction"]["refresh_every"] == 16  # the flag
    assert start["config"]["training"]["batch_size"] == 8  # the file
    assert (jit_catalog.base / "cli" / "derived" / f"{result['derived_uid']}.h5").exists()


@pytest.mark.slow
def test_replay_of_a_run_that_fails_exits_1(jit_catalog, bad_tomo_run, tiny_toml, capsys):
    code = main(
        [
            "replay",
            jit_catalog.uri,
            bad_tomo_run,
            "--api-key-file",
            key_file(jit_catalog),
            "--data-dir",
            str(jit_catalog.base / "cli"),
            "--config",
            str(tiny_toml),
            "--no-progress",
        ]
    )
    assert code == 1
    (run,) = derived_runs_for(runs_container(jit_catalog.client(), "derived"), bad_tomo_run)
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert "(fail: " in capsys.readouterr().out


def test_replay_bad_input_exits_2_or_3(jit_catalog, count_run, lost_files_run, tmp_path, capsys):
    key = ["--api-key-file", key_file(jit_catalog), "--no-progress"]
    unreachable = f"http://127.0.0.1:{free_port()}"
    cases = [
        ([jit_catalog.uri, "0123abcd-no-such-run", *key], 2, "No run '0123abcd-no-such-run'"),
        ([jit_catalog.uri, count_run, *key], 2, "is not a tomography scan"),
        (
            [jit_catalog.uri, lost_files_run, "--raw", "raw_lost", *key],
            2,
            "the Tiled server could not serve them either",
        ),
        ([jit_catalog.uri, "x", "--raw", "nope", *key], 3, "has no container 'nope'"),
        ([unreachable, "x", "--no-progress"], 3, "Cannot reach the Tiled server"),
        ([str(tmp_path / "empty"), "x"], 3, "No catalog in"),
        (
            [jit_catalog.uri, "x", "--api-key-file", key_file(jit_catalog, "wrongkey")],
            3,
            "Check the API key",
        ),  # fmt: skip
    ]
    for argv, expected, message in cases:
        assert main(["replay", *argv]) == expected, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


# --------------------------------------------------------------------------- listen
def test_listen_to_an_unreachable_broker_exits_3(capsys):
    port = free_port()
    assert main(["listen", "--zmq", f"127.0.0.1:{port}", "--catalog", "http://x:1"]) == 3
    assert "Cannot reach the 0MQ proxy" in capsys.readouterr().err  # before the catalog
    argv = ["listen", "--kafka", f"127.0.0.1:{port}", "--topic", "t", "--catalog", "x"]
    assert main([*argv, "--connect-timeout", "1"]) == 3
    assert "Cannot reach the Kafka broker" in capsys.readouterr().err


# ---------------------------------------------------------------------------- serve
@pytest.mark.slow
def test_serve_runs_a_catalog_others_find_and_stops_on_sigterm(tmp_path):
    from bluesky_jit.apps.session import open_catalog

    data_dir = tmp_path / "served"
    process = subprocess.Popen(
        [BIN / "bluesky-jit", "serve", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("API key" in line for line in lines):
            lines.append(process.stdout.readline())
        uri = next(line for line in lines if "serving the catalog" in line).split(" at ")[-1]
        connection = data_dir / "catalog" / "connection.json"
        assert stat.S_IMODE(connection.stat().st_mode) == 0o600
        key = json.loads(connection.read_text())["api_key"]
        assert not any(key in line for line in lines)  # the secret is never printed
        with open_catalog(data_dir, create=False) as session:  # finds the running server
            assert session.local is None and session.uri == uri.strip()
            session.runs("derived")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 130  # stopped cleanly, reported as interrupted
        assert not connection.exists()
        said = process.stdout.read()
        assert "stopping the catalog server" in said and "current run" not in said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- export
def test_export_writes_a_gif_and_a_png_from_the_catalog(jit_catalog, demo_run, tmp_path, capsys):
    from PIL import Image

    key = ["--api-key-file", key_file(jit_catalog)]
    gif = tmp_path / "slices.gif"
    assert main(["export", jit_catalog.uri, demo_run["derived_uid"], "--out", str(gif), *key]) == 0
    assert f"written to {gif}" in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.n_frames == demo_run["slices"]
    png = tmp_path / "report" / "slices.png"
    assert main(["export", jit_catalog.uri, demo_run["raw_uid"], "--out", str(png), *key]) == 0
    assert png.stat().st_size > 1000
    assert main(["export", jit_catalog.uri, "nope", "--out", str(png), *key]) == 2
    assert "No run 'nope'" in capsys.readouterr().err


def key_file(catalog, key=None):
    """The catalog's API key (or ``key``) in a file only its owner may read."""
    path = catalog.base / f"key-{key or 'right'}"
    path.write_text((key or catalog.api_key) + "\n")
    path.chmod(0o600)
    return str(path)


def test_a_key_on_the_command_line_is_refused(jit_catalog, demo_run, tmp_path, capsys):
    out = str(tmp_path / "s.png")
    argv = ["export", jit_catalog.uri, demo_run["derived_uid"], "--out", out]
    assert main([*argv, "--api-key", jit_catalog.api_key]) == 2
    err = capsys.readouterr().err
    assert "--api-key-file" in err and "TILED_API_KEY" in err
    assert jit_catalog.api_key not in err  # never echoed
    readable = tmp_path / "key"
    readable.write_text(jit_catalog.api_key)
    readable.chmod(0o644)
    assert main([*argv, "--api-key-file", str(readable)]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err and jit_catalog.api_key not in err
    assert main([*argv, "--api-key-file", key_file(jit_catalog)]) == 0
    assert os.path.exists(out)


def test_environment_api_key_is_used(jit_catalog, demo_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", jit_catalog.api_key)
    out = tmp_path / "s.png"
    assert main(["export", jit_catalog.uri, demo_run["derived_uid"], "--out", str(out)]) == 0
    assert os.path.exists(out)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    levels = ["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")  # 9**9 strings if expanded
    t0 = time.monotonic()
    assert main(["demo", "--config", str(bomb)]) == 2
    assert time.monotonic() - t0 < 5
    assert "YAML aliases" in capsys.readouterr().err
    huge = tmp_path / "huge.toml"
    huge.write_text("# padding\n" * 200_000)
    assert main(["demo", "--config", str(huge)]) == 2
    assert "a settings file is a few lines" in capsys.readouterr().err


def test_serve_on_every_interface_warns(tmp_path):
    """Started as a subprocess (real signals): the warning comes before the server runs."""
    env = {**os.environ}
    env.pop("TILED_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluesky_jit.apps.cli", "serve", "--data-dir", str(tmp_path),
         "--host", "0.0.0.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()  # printed at once, before the server starts
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert "reachable from the network" in line


def test_demo_serves_the_web_view_with_a_key_file_only_its_owner_reads(tmp_path, tiny_toml):
    """``demo --web PORT`` without a key: a new one in DATA_DIR/web_api_key, never printed."""
    import httpx

    from .helpers import wait_for

    env = {**os.environ}
    env.pop("TILED_API_KEY", None)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluesky_jit.apps.cli", "demo", "--web", str(port),
         "--data-dir", str(tmp_path), "--size", "32", "--rows", "4", "--angles", "16",
         "--rotations", "6", "--frame-rate", "8", "--no-progress", "--config", str(tiny_toml)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # printed once the view serves, before the scan
        assert f"live web view on http://127.0.0.1:{port}/" in line
        key_file = tmp_path / "web_api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        url = f"http://127.0.0.1:{port}/api/state"
        assert httpx.get(url).status_code == 401
        headers = {"Authorization": f"Apikey {key}"}
        wait_for(lambda: httpx.get(url, headers=headers).json()["raw_uid"], 120, "the scan shown")
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert key not in line + out + err

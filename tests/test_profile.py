"""The IPython profile (bluesky_jit/apps/profile_startup.py, linked from profiles/profile_jit).

`bluesky-jit profile install` writes it into tmp_path (IPython writes history, logs and pid
files there); IPython in a subprocess runs a short scan with it, pointed at the session's
Tiled server through BLUESKY_JIT_* variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from bluesky_jit.apps.cli import main
from bluesky_jit.apps.session import PROFILE_STARTUP, LazyCatalog, LazyJit, install_profile
from bluesky_jit.catalog import derived_runs_for, runs_container
from bluesky_jit.errors import CatalogError, ConfigError

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "profile_jit"
STARTUP = Path(find_spec("bluesky_jit.apps.profile_startup").origin)  # found, not imported
BIN = Path(sys.executable).parent


def test_the_checkout_profile_is_the_package_startup_file():
    (startup,) = (PROFILE / "startup").glob("*.py")
    assert startup.name == PROFILE_STARTUP
    assert startup.resolve() == STARTUP.resolve()


def test_profile_install_writes_the_startup_file_and_keeps_an_edited_one(tmp_path, capsys):
    target = tmp_path / "profile_jit"
    assert main(["profile", "install", str(target)]) == 0
    path = target / "startup" / PROFILE_STARTUP
    assert path.read_text() == STARTUP.read_text()
    permissions = (target / "startup" / "user_group_permissions.yaml").read_text()
    assert "primary:" in permissions  # the queue server's default user group
    assert f"--profile-dir={target}" in capsys.readouterr().out
    assert install_profile(target) == path  # the same file again: fine
    path.write_text("# edited\n")
    with pytest.raises(ConfigError, match="--force"):
        install_profile(target)
    assert main(["profile", "install", str(target)]) == 2
    assert install_profile(target, force=True).read_text() != "# edited\n"


def test_importing_the_startup_file_without_ipython_starts_nothing(tmp_path):
    """Plans and devices exist; no catalog server, no child process, IPython not imported."""
    code = """
import inspect, sys, psutil
import bluesky_jit.apps.profile_startup as p
assert "IPython" not in sys.modules
assert inspect.isgeneratorfunction(p.tomo) and inspect.isgeneratorfunction(p.tomo_step)
assert {p.det.name, p.rot_stage.name, p.shutter.name, p.sample_stage.name}
assert not p.jit.started and p.jit.summaries == () and p.jit.flush(1)
assert psutil.Process().children() == [], psutil.Process().children()
print("DESCRIPTION", p.catalog.description)
"""
    env = {**os.environ, "MPLBACKEND": "Agg", "BLUESKY_JIT_DATA_DIR": str(tmp_path / "data")}
    env.pop("BLUESKY_JIT_CATALOG", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(opened at the first run)" in result.stdout
    assert not (tmp_path / "data" / "catalog").exists()


@pytest.mark.slow
def test_ipython_with_the_profile_runs_a_scan_into_the_catalog(jit_catalog, tiny_toml, tmp_path):
    profile = tmp_path / "profile_jit"
    install_profile(profile)
    settings = tmp_path / "settings.toml"
    settings.write_text(
        tiny_toml.read_text() + "[beamline]\nsize = 32\nrows = 4\nphotons = 300.0\n"
    )
    data_dir = jit_catalog.base / "profile"  # readable by the session's server
    env = {
        **os.environ,
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "MPLBACKEND": "Agg",
        "BLUESKY_JIT_CONFIG": str(settings),
        "BLUESKY_JIT_CATALOG": jit_catalog.uri,
        "BLUESKY_JIT_API_KEY": jit_catalog.api_key,
        "BLUESKY_JIT_DATA_DIR": str(data_dir),
    }
    code = (
        "(uid,) = RE(tomo(det, rot_stage, shutter, sample_stage, num_angles=16)); "
        "assert jit.flush(120); "
        "print('RAW_UID', uid, 'RUNS', len(jit.summaries))"
    )
    result = subprocess.run(
        [
            BIN / "ipython",
            f"--profile-dir={profile}",
            "--no-banner",
            "--colors=NoColor",
            "--HistoryManager.hist_file=:memory:",
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"bluesky-jit profile: catalog {jit_catalog.uri} (opened at the first run)" in out
    line = next(line for line in out.splitlines() if line.startswith("RAW_UID"))
    uid = line.split()[1]
    client = jit_catalog.client()
    assert uid in runs_container(client, "raw")  # the raw run, written by the profile
    (derived,) = derived_runs_for(runs_container(client, "derived"), uid)
    assert derived.metadata["stop"]["exit_status"] == "success"
    config = derived.metadata["start"]["config"]
    assert config["reconstruction"]["refresh_every"] == 8  # from the settings file
    assert f"-> derived run {derived.metadata['start']['uid']} (success" in out


def test_lazy_jit_that_cannot_start_logs_and_never_raises_into_the_run_engine(caplog):
    def build():
        raise ConfigError("no such device: cuda:7")

    jit = LazyJit(build)
    jit("descriptor", {})  # before a start document: nothing to start
    jit("start", {"uid": "3f2a"})
    jit("stop", {})
    assert not jit.started and jit.flush(1) and list(jit.summaries) == []
    assert "run 3f2a goes on without it" in caplog.text and "cuda:7" in caplog.text
    with pytest.raises(AttributeError, match="before the first run"):
        jit.move_slices(slice_row=1)


def test_lazy_catalog_refuses_a_bad_target_at_once(tmp_path):
    with pytest.raises(CatalogError, match="http"):
        LazyCatalog("ftp://example.org")
    catalog = LazyCatalog(tmp_path / "data")
    assert catalog.local is None and catalog.spool_dir("raw") == tmp_path / "data" / "spool" / "raw"
    assert not (tmp_path / "data").exists()

"""The IPython profile (profiles/profile_jit): IPython in a subprocess runs a short scan.

The profile directory is copied to tmp_path (IPython writes history, logs and pid files
into it) and pointed at the session's Tiled server through BLUESKY_JIT_* variables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bluesky_jit.catalog import derived_runs_for, runs_container

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "profile_jit"
BIN = Path(sys.executable).parent


def test_startup_files_are_numbered_and_thin():
    files = sorted(p.name for p in (PROFILE / "startup").glob("*.py"))
    assert files == sorted(files) and len(files) >= 5
    assert all(name[:2].isdigit() and name[2] == "-" for name in files)
    for path in (PROFILE / "startup").glob("*.py"):
        code = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", '"""', "from ", "import "))
        ]
        assert len(code) <= 10, path  # logic lives in bluesky_jit.apps.session


@pytest.mark.slow
def test_ipython_with_the_profile_runs_a_scan_into_the_catalog(jit_catalog, tiny_toml, tmp_path):
    profile = tmp_path / "profile_jit"
    shutil.copytree(PROFILE / "startup", profile / "startup")
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
        "(uid,) = RE(tomo(num_angles=16, rotations=1)); "
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
    assert "bluesky-jit profile: catalog Tiled catalog" in out
    line = next(line for line in out.splitlines() if line.startswith("RAW_UID"))
    uid = line.split()[1]
    client = jit_catalog.client()
    assert uid in runs_container(client, "raw")  # the raw run, written by the profile
    (derived,) = derived_runs_for(runs_container(client, "derived"), uid)
    assert derived.metadata["stop"]["exit_status"] == "success"
    config = derived.metadata["start"]["config"]
    assert config["reconstruction"]["refresh_every"] == 8  # from the settings file
    assert f"-> derived run {derived.metadata['start']['uid']} (success" in out

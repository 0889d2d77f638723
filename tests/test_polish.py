"""What a new user notices in the first minutes: the version,
the licence, quiet ``-v``, short uids where the README uses them, a summary without
``nan dB``."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from bluesky_jit import __version__
from bluesky_jit.apps.cli import main
from bluesky_jit.apps.demo import format_summary

from .test_cli import key_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bluesky-jit {__version__}"


def test_licence_is_bsd_3_clause_as_an_spdx_string():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, bluesky_jit contributors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"  # PEP 639: no table, no classifier
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


# ------------------------------------------------------------------- short uids, -v
def test_show_takes_a_short_raw_uid(jit_catalog, demo_run):
    """The README's ``show(uri, "3f2a9c1e")``: the first characters of a raw uid."""
    from bluesky_jit.apps.live import open_derived, show

    short = demo_run["raw_uid"][:8]
    run = open_derived(jit_catalog.uri, short, api_key=jit_catalog.api_key)
    # the newest derived run of that raw run (other tests may have replayed it since)
    assert run.metadata["start"]["raw_uid"] == demo_run["raw_uid"]
    assert run.metadata["start"]["plan_name"] == "bluesky_jit"
    figure = show(jit_catalog.uri, short, api_key=jit_catalog.api_key)
    assert run.metadata["start"]["uid"][:8] in figure._suptitle.get_text()


def test_export_takes_a_short_raw_uid_and_v_prints_no_http_requests(
    jit_catalog, demo_run, tmp_path
):
    """``bluesky-jit export DATA <short uid>``; ``-v`` without a line per HTTP request."""

    def export(*flags):
        out = tmp_path / f"slices{len(flags)}.png"
        argv = [str(BIN / "bluesky-jit"), *flags, "export", jit_catalog.uri]
        argv += [demo_run["raw_uid"][:8], "--out", str(out)]
        argv += ["--api-key-file", key_file(jit_catalog)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.stat().st_size > 1000
        return done.stderr

    assert "HTTP Request" not in export("-v")
    assert "HTTP Request" in export("-vv")  # kept for -vv


# ------------------------------------------------------------------------- summary
def result(**changes):
    """A demo summary dict (bluesky_jit.apps.demo) with ``changes``."""
    from bluesky_jit.config import JitConfig

    config = changes.pop("config", JitConfig())
    base = {
        "raw_uid": "r" * 36,
        "derived_uid": "d" * 36,
        "exit_status": "success",
        "reason": "",
        "catalog": "http://127.0.0.1:8000",
        "frames": 180,
        "scan_seconds": 12.0,
        "achieved_frame_rate": 15.0,
        "settings": {"frame_rate": 15.0, "paced": True, "config": config.to_dict()},
        "projections": 180,
        "projections_per_s": 15.0,
        "slices": 10,
        "denoised": 0,
        "train_steps": 200,
        "train_steps_per_s": 20.0,
        "final_alpha": 1.3,
        "psnr_fbp": 21.5,
        "psnr_denoised": math.nan,
    }
    return base | changes


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({}, "did not yet beat the plain reconstruction"),
        ({"final_alpha": math.nan}, "alpha was never measured"),
        ({"train_steps": 0, "final_alpha": math.nan}, "never trained"),
        ({"train_steps": 0, "config_train": False}, "training is off"),
        (
            {"slices": 0, "psnr_fbp": math.nan, "reason": "No slice was reconstructed: 40"},
            "no slice was reconstructed",
        ),
    ],
)
def test_the_summary_says_why_nothing_was_denoised_never_nan_db(changes, why):
    from bluesky_jit.config import JitConfig

    if changes.pop("config_train", True) is False:
        changes["config"] = JitConfig(train=False)
    text = format_summary(result(**changes))
    assert "nan" not in text.lower(), text
    assert why in text, text
    psnr = next(line for line in text.splitlines() if line.startswith("PSNR"))
    assert ("nothing was denoised" in psnr) or ("not measured" in psnr), psnr


def test_the_summary_shows_both_psnrs_when_there_are_both():
    text = format_summary(result(denoised=3, final_alpha=0.6, psnr_denoised=24.25))
    assert "FBP 21.50 dB, denoised 24.25 dB" in text
    assert "0.600 (1 = no denoising" in text


# -------------------------------------------------------------------------- README
README = (ROOT / "README.md").read_text()


def python_blocks(text):
    """The README's ```python blocks, in order."""
    import re

    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def undefined_names(source):
    """Names a snippet loads but neither imports nor assigns (builtins aside)."""
    import ast
    import builtins

    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            bound.add(node.optional_vars.id)
    loaded = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    return loaded - bound


def test_the_readme_replay_snippet_defines_what_it_uses():
    (block,) = [b for b in python_blocks(README) if "replay(" in b and "import" in b]
    assert undefined_names(block) == set(), block
    assert "session.data_dir" in block  # derived files where the catalog's server reads


def test_the_readme_moves_slices_within_the_demo_detector():
    import re

    from bluesky_jit.apps.demo import DemoOptions

    rows = [int(r) for r in re.findall(r"move_slices\(slice_row=(\d+)\)", README)]
    assert rows and all(0 <= r < DemoOptions.rows for r in rows), rows


def test_papers_are_cited_by_authors_not_by_internal_file_names():
    import re

    internal = re.compile(r"seed[ _-]?00[0-3]", re.IGNORECASE)
    files = [ROOT / "README.md", *ROOT.glob("benchmarks/results/*.json")]
    for folder in ("bluesky_jit", "simulated_devices", "benchmarks", "scripts", "tests"):
        files += ROOT.glob(f"{folder}/**/*.py")
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if internal.search(line)
    ]
    assert not hits, hits


def test_the_readme_cites_papers_and_points_at_no_missing_file():
    references = README[README.index("## References") :]
    for authors in ("Graas", "Hendriksen", "Liu", "Pelt", "Roberts"):
        assert authors in references
    assert "STYLE.md" not in README or (ROOT / "STYLE.md").exists()
    assert "until_quality" in README and "### Steering" in README
    for stream in ("reconstruction_xz", "reconstruction_yz"):
        assert f"`{stream}`" in README


def test_a_device_that_cannot_run_is_refused_before_the_scan(tmp_path, capsys):
    import torch

    from bluesky_jit.callbacks import JitCallback
    from bluesky_jit.config import JitConfig
    from bluesky_jit.errors import ConfigError

    with pytest.raises(ConfigError, match="not a torch device"):
        JitCallback(config=JitConfig(device="gpu"), directory=tmp_path)
    assert main(["demo", "--angles", "1", "--data-dir", str(tmp_path)]) == 2
    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError, match="no CUDA device"):
        JitCallback(config=JitConfig(device="cuda"), directory=tmp_path)
    start = time.monotonic()
    assert main(["demo", "--device", "cuda", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert time.monotonic() - start < 60  # refused up front, no scan
    assert "no CUDA device" in capsys.readouterr().err


def test_a_missing_warm_start_file_is_refused_before_the_scan(tmp_path, capsys):
    from bluesky_jit.callbacks import JitCallback
    from bluesky_jit.config import JitConfig
    from bluesky_jit.errors import ConfigError
    from bluesky_jit.worker_process import JitProcess

    missing = tmp_path / "ckpt" / "nope" / "latest.pt"
    config = JitConfig(warm_start=str(missing), online_strategy="frozen")
    with pytest.raises(ConfigError, match="is not a file here"):
        JitCallback(config=config, directory=tmp_path)
    with pytest.raises(ConfigError, match="is not a file here"):
        JitProcess(config=config, directory=tmp_path)  # refused by the child, raised here
    argv = ["demo", "--warm-start", str(missing), "--online-strategy", "frozen"]
    assert main([*argv, "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "warm_start" in capsys.readouterr().err


def test_the_readme_lists_every_fault_tested_with_a_test_that_exists():
    import re

    section = README.split("#### Every bad input and fault tested")[1].split("</details>")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 60
    tests = Path(__file__).parent
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.split("|")[-2])
        assert named, f"no test named for {row}"
        for file, name in named:
            assert f"def {name}(" in (tests / file).read_text(), f"{file}::{name} in {row}"

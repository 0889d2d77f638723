"""The README's main job, `bluesky-jit demo`, on a tiny configuration."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    summary = tmp_path / "summary.json"
    figures = tmp_path / "figures"
    cmd = [
        sys.executable, "-m", "bluesky_jit.apps.cli", "demo",
        "--data-dir", str(tmp_path / "data"),
        "--size", "48", "--rows", "8", "--angles", "24", "--rotations", "2",
        "--no-pace", "--refresh-every", "6",
        "--summary", str(summary), "--figures", str(figures),
        "--live",  # the live figure, drawn off screen (Agg)
    ]  # fmt: skip
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["exit_status"] == "success"
    assert result["derived_in_catalog"] is True
    assert result["projections"] == 48
    assert result["slices"] >= 2
    assert result["train_steps"] > 0
    for key in ("psnr_fbp", "psnr_denoised", "final_alpha", "projections_per_s"):
        assert isinstance(result[key], float)
    assert result["machine"]["cpus"] >= 1
    assert sorted(p.name for p in figures.iterdir()) == ["learning_curve.png", "slices.png"]
    assert "derived run" in done.stdout and result["derived_uid"] in done.stdout
    # every frame (darks, flats, projections) counted, and every document in the catalog
    assert result["frames"] == 48 + 2 * 10 and result["achieved_frame_rate"] > 0
    writes = result["catalog_writes"]
    for kind in ("raw", "derived"):
        assert writes[kind]["lost"] == 0 and writes[kind]["runs_pending"] == 0
        assert writes[kind]["written"] == writes[kind]["received"] > 0
    assert "frames/s (unpaced)" in done.stdout
    # the progress bar's last drawing (stderr) shows the summary's counts
    last = [part for part in done.stderr.split("\r") if "slices=" in part][-1]
    assert f"slices={result['slices']}," in last
    assert f"train_steps={result['train_steps']}]" in last

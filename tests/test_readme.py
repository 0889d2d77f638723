"""The README's Python blocks run, in order, against a catalog that `bluesky-jit demo` wrote.

The blocks share one namespace, as a reader's session would. The few things a
reader puts in by hand are put in here, each listed below with why: the uids
the README abbreviates (``3f2a9c1e``), the directories it names for a beamline
(``/data``) and scans long enough to be worth steering. Every replacement must
still match the README (a test fails when the README changes under it), and a
block that is not run says why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import TINY_SCAN, TOOTH

README = Path(__file__).resolve().parents[1] / "README.md"

NOT_RUN = {
    "RunKeyedPublisher": "publishes to a Kafka broker, and none can be run here "
    "(tests/test_listen.py runs the publisher against a stand-in)",
}
"""A text found in a block -> why that block is not run."""

SCALED = {
    "num_angles=90, rotations=20": "num_angles=16, rotations=3",
    "config=JitConfig(),": "config=JitConfig.from_dict(TINY),",
}
"""Scans the README runs for minutes, scaled to seconds."""


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def placeholders(data: Path, raw_uid: str, derived_uid: str) -> dict[str, str]:
    """What the README writes for a reader's own values -> this test's values."""
    return {
        '"scan.h5"': f'"{TOOTH}"',  # a recorded scan: the real tooth scan in shared/data
        "3f2a9c1e": raw_uid[:8],
        '"http://127.0.0.1:8000"': "catalog.uri",  # the catalog the first block started
        'api_key="..."': "api_key=catalog.api_key",
        '"/data': f'"{data}',
        'derived_uid = "77b0..."': f'derived_uid = "{derived_uid}"',
    }


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8
    assert all(block.strip() for block in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, tiny_toml):
    import json
    import tomllib

    import matplotlib

    from bluesky_jit.apps.cli import main

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # the README's relative paths: ./bluesky_jit_data
    summary = tmp_path / "summary.json"
    args = ["demo", *TINY_SCAN, "--config", str(tiny_toml), "--no-progress"]
    assert main([*args, "--summary", str(summary)]) == 0
    demo = json.loads(summary.read_text())

    replace = {**placeholders(tmp_path / "data", demo["raw_uid"], demo["derived_uid"]), **SCALED}
    used = dict.fromkeys(replace, 0)
    namespace: dict = {"TINY": tomllib.loads(tiny_toml.read_text())["jit"]}
    ran = 0
    try:
        for number, block in enumerate(python_blocks(README.read_text()), 1):
            reason = next((why for text, why in NOT_RUN.items() if text in block), None)
            if '"scan.h5"' in block and not TOOTH.exists():
                reason = f"{TOOTH} is not there"
            if reason is not None:
                used.update({old: used[old] + 1 for old in replace if old in block})
                continue
            for old, new in replace.items():
                used[old] += block.count(old)
                block = block.replace(old, new)
            try:
                exec(compile(block, f"README.md python block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README python block {number} failed:\n{block}") from error
            ran += 1
    finally:
        for name in ("jit", "raw"):  # what the blocks started and a reader would close
            closer = getattr(namespace.get(name), "close", None)
            if closer is not None:
                closer()
        catalog = namespace.get("catalog")
        if catalog is not None:
            catalog.close()
    assert ran >= 7
    assert [old for old, count in used.items() if count == 0] == []
    # what the blocks did: read slices back, replayed the demo's run, steered a scan
    assert namespace["slices"].ndim == 3 and 1 <= len(namespace["slices"]) <= demo["slices"]
    assert namespace["summaries"] and namespace["summaries"][0].exit_status == "success"
    assert namespace["report"]["events"] > 0

"""Live view and read-back (bluesky_jit.apps.live), headless (matplotlib Agg), real Tiled server."""

from __future__ import annotations

import threading

import matplotlib
import numpy as np
import pytest

from bluesky_jit.catalog import documents, runs_container

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def derived(jit_catalog, demo_run):
    return runs_container(jit_catalog.client(), "derived")[demo_run["derived_uid"]]


@pytest.mark.slow
def test_live_view_follows_a_run_while_it_is_processed(
    jit_catalog, demo_run, tiny_config, tmp_path
):
    from bluesky_jit.apps.live import LiveView
    from bluesky_jit.apps.replay import replay_documents
    from bluesky_jit.callbacks import JitCallback

    raw = runs_container(jit_catalog.client(), "raw")[demo_run["raw_uid"]]
    docs = list(documents(raw))
    jit = JitCallback(config=tiny_config, directory=tmp_path)
    view = LiveView(jit, interval_s=0.05)
    updates = []
    original = view.update
    view.update = lambda: updates.append(original()) or updates[-1]
    worker = threading.Thread(target=replay_documents, args=(docs, jit), daemon=True)
    worker.start()
    view.run_while(worker.is_alive)  # the CLI's --live loop, in this (main) thread
    jit.close(30)
    assert any(updates)
    summary = jit.summaries[-1]
    rec_axis, den_axis = view.figure.axes[:2]
    np.testing.assert_array_equal(rec_axis.images[0].get_array(), summary.last_slice)
    if summary.last_denoised is not None:  # trained before the last refresh
        np.testing.assert_array_equal(den_axis.images[0].get_array(), summary.last_denoised)
    assert len(view._panels.loss_line.get_xdata()) == len(summary.metrics)
    assert view.save(tmp_path / "live.png").stat().st_size > 1000


def test_show_reads_a_derived_run_back_in_two_lines(jit_catalog, demo_run, derived):
    from bluesky_jit.apps.live import show

    figure = show(jit_catalog.uri, demo_run["derived_uid"][:8], api_key=jit_catalog.api_key)

    last = derived["reconstruction"]["reconstruction"].read()[-1]
    np.testing.assert_array_equal(figure.axes[0].images[0].get_array(), last)
    assert demo_run["derived_uid"][:8] in figure._suptitle.get_text()


def test_export_png_and_gif(derived, tmp_path):
    from PIL import Image

    from bluesky_jit.apps.live import export, read_derived

    data = read_derived(derived)
    assert data.reconstruction.shape[1:] == (32, 32)
    assert len(data.reconstruction_index) == len(data.reconstruction)
    assert {"loss", "alpha"} <= set(data.metrics)
    gif = export(data, tmp_path / "a.gif", fps=2)
    with Image.open(gif) as image:
        assert image.n_frames == len(data.reconstruction)
        assert image.size == (32 * 2 + 4, 32)
    png = export(derived, tmp_path / "a.png")
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_a_raw_run_is_not_a_derived_run(jit_catalog, demo_run):
    from bluesky_jit.apps.live import NotDerivedError, read_derived

    raw = runs_container(jit_catalog.client(), "raw")[demo_run["raw_uid"]]
    with pytest.raises(NotDerivedError, match="not a bluesky_jit derived run"):
        read_derived(raw)
    with pytest.raises(ValueError, match="Cannot tell the export format of .slices.jpg"):
        from bluesky_jit.apps.live import export

        export(raw, "slices.jpg")

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

    from bluesky_jit.apps.export import export
    from bluesky_jit.apps.live import read_derived

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
        from bluesky_jit.apps.export import export

        export(raw, "slices.jpg")


@pytest.mark.slow
def test_live_view_shows_the_plane_asked_for_and_says_when_there_is_no_display(
    RE, tmp_path, caplog
):
    """All three planes (each from its own image stream), on Agg: a clear line points to
    the web view."""
    from bluesky_jit.apps.live import PLANES, LiveView
    from bluesky_jit.callbacks import JitCallback
    from simulated_devices.beamline import hw as make_hw

    from .test_callbacks import CONFIG, run_scan, source

    jit = JitCallback(config=CONFIG, directory=tmp_path / "derived")
    view = LiveView(jit, interval_s=0.05, planes="all")
    run_scan(RE, jit, make_hw(tmp_path / "raw", source=source()))
    with caplog.at_level("WARNING", logger="bluesky_jit.apps.live"):
        view.run_while(lambda: False)
    assert "No display for the live figure" in caplog.text
    assert "bluesky-jit demo --web" in caplog.text
    images = jit.summaries[-1].images
    assert len(view.figure.axes) == 3 + 3  # three planes, denoised, loss and its alpha twin
    for ax, plane in zip(view.figure.axes, PLANES, strict=False):
        assert ax.get_title() == f"reconstructed {plane}"
        np.testing.assert_array_equal(ax.images[0].get_array(), images[PLANES[plane]])
    assert images["reconstruction_xz"].shape != images["reconstruction"].shape

    only_yz = LiveView(jit, planes="yz")
    assert only_yz.update()
    np.testing.assert_array_equal(
        only_yz.figure.axes[0].images[0].get_array(), images["reconstruction_yz"]
    )
    with pytest.raises(ValueError, match="Live planes are"):
        LiveView(jit, planes="xyz")

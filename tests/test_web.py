"""The live web view (bluesky_jit.apps.web) beside a real scan: over HTTP, and in Chromium.

One simulated scan (real RunEngine, ophyd-async devices, JitCallback) runs on a
thread for the module while the web view serves it on a free port of 127.0.0.1.
"""

from __future__ import annotations

import io
import secrets
import shutil
import threading
from types import SimpleNamespace

import pytest

from bluesky_jit.apps.web import PLANES, WebView
from bluesky_jit.callbacks import JitCallback
from simulated_devices.beamline import hw as make_hw
from simulated_devices.plans import tomo_continuous

from .helpers import run_engine, wait_for
from .test_callbacks import ANGLES, CONFIG, SHAPE, source


@pytest.fixture(scope="module")
def live_scan(tmp_path_factory):
    """A paced scan (long: paused and stopped at teardown) with the web view on it."""
    from bluesky.utils import RunEngineInterrupted

    tmp = tmp_path_factory.mktemp("web")
    with run_engine() as RE:
        RE.context_managers = []  # RE() runs on a thread: no Ctrl-C handler there
        jit = JitCallback(config=CONFIG, directory=tmp / "derived")
        RE.subscribe(jit)
        beamline = make_hw(tmp / "raw", source=source(), frame_rate=20.0, paced=True)
        plan = tomo_continuous(
            *beamline.plan_devices,
            num_angles=ANGLES,
            rotations=200,
            num_darks=3,
            num_flats=3,
        )

        def scan():
            try:
                RE(plan)
            except RunEngineInterrupted:
                RE.stop()

        thread = threading.Thread(target=scan, daemon=True)
        thread.start()
        view = WebView(jit, api_key=secrets.token_hex(16)).start()
        try:
            wait_for(lambda: _images(jit) >= set(PLANES.values()), 120, "the first slices")
            yield SimpleNamespace(jit=jit, view=view, key=view._key.decode())
        finally:
            view.stop()
            if thread.is_alive():
                RE.request_pause(defer=False)
            thread.join(60)
            jit.close(30)


def _images(jit):
    running = jit.progress()
    return set(running[-1].images) if running else set()


def _recon(jit):
    """The reconstructor of the run in progress: the pipeline's own state."""
    return list(jit.pipelines.values())[-1].recon


def test_http_api_serves_the_slices_and_steers_the_scan_with_the_key_only(live_scan):
    import httpx
    import numpy as np
    from PIL import Image

    url, jit = live_scan.view.url, live_scan.jit
    key = {"Authorization": f"Apikey {live_scan.key}"}
    assert url.startswith("http://127.0.0.1:")
    for headers in ({}, {"Authorization": "Apikey wrong"}, {"Authorization": live_scan.key}):
        for response in (
            httpx.get(url + "api/state", headers=headers),
            httpx.get(url + "api/image/reconstruction.png", headers=headers),
            httpx.post(url + "api/center", json={"center_of_rotation": 20}, headers=headers),
        ):
            assert response.status_code == 401
            assert "API key" in response.json()["detail"]
    assert "API key" in httpx.get(url).text  # the page holds no data: it asks for the key

    state = httpx.get(url + "api/state", headers=key).json()
    assert state["raw_uid"] == jit.progress()[-1].raw_uid and state["status"] == "running"
    assert set(PLANES.values()) <= set(state["images"])
    assert (state["rows"], state["cols"]) == SHAPE
    assert all(set(row) == {"step", "loss", "alpha"} for row in state["metrics"])
    png = httpx.get(url + "api/image/reconstruction_xz.png", headers=key)
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.size[::-1] == jit.progress()[-1].images["reconstruction_xz"].shape
    again = httpx.get(url + "api/image/reconstruction_xz.png", headers=key | {
        "If-None-Match": png.headers["etag"]})  # fmt: skip
    assert again.status_code in (200, 304)  # 200 once a newer slice came
    assert httpx.get(url + "api/image/nothing.png", headers=key).status_code == 404

    x = 3 * state["voxel_size"]
    for body in ({"plane": "xy", "position": 2}, {"plane": "yz", "position": x}):
        assert httpx.post(url + "api/move", json=body, headers=key).status_code == 202
    center = state["center_of_rotation"] + 1.5
    response = httpx.post(url + "api/center", json={"center_of_rotation": center}, headers=key)
    assert response.status_code == 202, response.text
    wait_for(lambda: _recon(jit).row == 2, 60, "the axial slice at row 2")
    wait_for(lambda: _recon(jit).slices[2].center[0] == x, 60, "the yz slice moved")
    wait_for(lambda: _recon(jit).geometry.center_of_rotation == center, 60, "the new centre")
    wait_for(lambda: jit.progress()[-1].positions["reconstruction"] == 2, 60, "row 2 shown")
    state = httpx.get(url + "api/state", headers=key).json()
    assert np.isclose(state["positions"]["reconstruction_yz"], x)
    assert state["center_of_rotation"] == center

    for path, body, message in (
        ("api/move", {"plane": "xq", "position": 1}, "plane must be one of"),
        ("api/move", {"plane": "xy", "position": SHAPE[0]}, "detector row 0..7"),
        ("api/move", {"plane": "xz", "position": 1e6}, "mm from the rotation axis"),
        ("api/move", [1, 2], "Expected a JSON object"),
        ("api/center", {"center_of_rotation": "middle"}, "Expected numbers"),
        ("api/center", {"center_of_rotation": SHAPE[1] + 3}, "detector column 0..47"),
    ):
        response = httpx.post(url + path, json=body, headers=key)
        assert response.status_code == 400 and message in response.json()["detail"], body


def _chromium():
    """A headless Chromium driven by selenium, or the reason there is none."""
    try:
        from selenium import webdriver
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, "no chromium and chromedriver (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver)), ""


@pytest.fixture(scope="module")
def chromium():
    driver, reason = _chromium()
    if driver is None:
        pytest.skip(f"the web view's browser test needs a real Chromium: {reason}")
    yield driver
    driver.quit()


def test_the_page_in_chromium_shows_the_scan_and_steers_it(live_scan, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    jit, page = live_scan.jit, chromium
    wait = WebDriverWait(page, 60)

    def element(id_):
        return page.find_element(By.ID, id_)

    def connect(key):
        element("key").clear()
        element("key").send_keys(key)
        element("key-go").click()

    page.get(live_scan.view.url)
    connect("not-the-key")
    wait.until(lambda _: element("status").text.startswith("Refused"))
    assert page.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "refused"
    assert not element("slice").get_attribute("data-etag")

    connect(live_scan.key)
    wait.until(lambda _: element("slice").get_attribute("data-etag"))
    first = element("slice").get_attribute("data-etag")
    wait.until(lambda _: element("slice").get_attribute("data-etag") != first)  # a new slice
    assert element("slice").get_attribute("src").startswith("blob:")
    wait.until(lambda _: len(element("loss").get_attribute("points").split()) >= 2)
    assert "training steps" in element("run").text

    Select(element("plane")).select_by_value("xz")
    wait.until(lambda _: element("slice").get_attribute("data-stream") == "reconstruction_xz")
    y = -2 * jit.progress()[-1].geometry.voxel_size
    element("position").send_keys(str(y))
    element("move").click()
    wait.until(lambda _: _recon(jit).slices[1].center[1] == y)
    wait.until(lambda _: element("where").text == f"{y:.3f} mm")

    center = jit.progress()[-1].geometry.center_of_rotation - 2
    element("center").send_keys(str(center))
    element("set-center").click()
    wait.until(lambda _: _recon(jit).geometry.center_of_rotation == center)
    wait.until(lambda _: element("center-now").text == f"{center:.2f}")
    assert element("asked").get_attribute("data-ok") == "true"

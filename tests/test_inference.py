"""The denoiser that always uses the newest weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_jit.errors import CheckpointError, ConfigError, ScanDataError
from bluesky_jit.inference import Denoiser
from bluesky_jit.models import build_model
from bluesky_jit.models.checkpoint import save_checkpoint
from bluesky_jit.pairs import ReplayBuffer
from bluesky_jit.training import Normalizer, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(rng, n, size, k=5):
    """Smooth random images, shape (n, size, size), values ~[0, 2] (k blobs per 20x20)."""
    k = max(k, k * size * size // 400)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0, size, (2, n, k, 1, 1))
    width = rng.uniform(2, 5, (n, k, 1, 1))
    amp = rng.uniform(0.5, 1, (n, k, 1, 1))
    return (amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))).sum(axis=1)


def noisy(rng, clean, sigma=0.3, scale=0.01, offset=0.02):
    return (offset + scale * (clean + sigma * rng.standard_normal(clean.shape))).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """A trainer after a short Noise2Noise run on 20x20 patches of smooth blobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    clean = blobs(rng, 256, 20)[:, None]
    buffer = ReplayBuffer(256, rng=np.random.default_rng(1))
    buffer.push(noisy(rng, clean), noisy(rng, clean))
    trainer = Trainer(build_model("unet", seed=0), buffer, learning_rate=1e-3, batch_size=16)
    for _ in range(150):
        trainer.step()
    torch.set_num_threads(before)
    return trainer


def test_denoised_slice_is_closer_to_clean_than_the_noisy_one(trained):
    rng = np.random.default_rng(2)
    truth = blobs(rng, 1, 61)[0]  # a "full slice" of odd size, never trained on
    clean = (0.02 + 0.01 * truth).astype(np.float32)
    image = noisy(rng, truth)
    denoiser = Denoiser(build_model("unet"), source=trained)
    out = denoiser(image)
    assert out.shape == image.shape and out.dtype == np.float32
    assert denoiser.weights_version == trained.steps
    noisy_mse = np.mean((image - clean) ** 2)
    denoised_mse = np.mean((out - clean) ** 2)
    assert denoised_mse < 0.5 * noisy_mse  # measured: about 0.1


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (13, 29), (16, 16), (31, 8)])
def test_output_shape_equals_input_and_crop_is_aligned(shape):
    """An identity network (residual U-Net at init) must give back the input exactly."""
    rng = np.random.default_rng(3)
    image = rng.standard_normal(shape).astype(np.float32)
    model = build_model("unet", {"residual": True}, seed=0)
    denoiser = Denoiser(model, normalizer=Normalizer(offset=0.5, scale=2.0))
    out = denoiser(image)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_picks_up_newer_weights_only_when_newer():
    rng = np.random.default_rng(4)
    clean = blobs(rng, 8, 20)[:, None]
    buffer = ReplayBuffer(8)
    buffer.push(noisy(rng, clean), noisy(rng, clean))
    trainer = Trainer(build_model("unet", {"features": 2}, seed=0), buffer, batch_size=4)
    denoiser = Denoiser(trainer.model, source=trainer)  # its own copy of the network
    image = noisy(rng, blobs(rng, 1, 24)[0])

    assert np.array_equal(denoiser(image), image)  # no normaliser yet: shown unchanged
    assert denoiser.weights_version == 0
    trainer.step()
    first = denoiser(image)
    assert denoiser.weights_version == 1
    loads = []
    original = denoiser.model.load_state_dict
    denoiser.model.load_state_dict = lambda state: loads.append(1) or original(state)
    assert np.array_equal(denoiser(image), first)  # same version: no reload
    assert loads == []
    trainer.step()
    trainer.step()
    second = denoiser(image)
    assert denoiser.weights_version == 3 and loads == [1]
    assert not np.array_equal(first, second)
    assert denoiser.model is not trainer.model


def test_from_checkpoint_matches_the_live_denoiser(tmp_path, trained):
    rng = np.random.default_rng(5)
    image = noisy(rng, blobs(rng, 1, 33)[0])
    live = Denoiser(build_model("unet"), source=trained)
    path = trained.save(tmp_path / "c.pt")
    offline = Denoiser.from_checkpoint(path, expected_name="unet")
    assert offline.weights_version == trained.steps
    np.testing.assert_array_equal(offline(image), live(image))


def test_checkpoint_without_normaliser_raises(tmp_path):
    model = build_model("unet", {"features": 2})
    path = save_checkpoint(tmp_path / "c.pt", name="unet", config={"features": 2}, model=model)
    with pytest.raises(CheckpointError, match="normalizer"):
        Denoiser.from_checkpoint(path)


def test_channels_and_bad_inputs():
    model = build_model("unet", {"in_channels": 3, "out_channels": 2, "features": 2})
    denoiser = Denoiser(lambda: model, normalizer=Normalizer())
    assert denoiser(np.zeros((3, 10, 12))).shape == (2, 10, 12)
    with pytest.raises(ScanDataError, match="expected"):
        denoiser(np.zeros(5))
    with pytest.raises(ConfigError, match="Module"):
        Denoiser(lambda: "not a model")
    with pytest.raises(ConfigError, match="pad_multiple"):
        Denoiser(model, pad_multiple=0)

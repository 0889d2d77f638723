"""The denoiser that always uses the newest weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_jit.buffers import ReplayBuffer
from bluesky_jit.errors import CheckpointError, ConfigError, ScanDataError
from bluesky_jit.inference import Denoiser
from bluesky_jit.models import build_model
from bluesky_jit.models.checkpoint import save_checkpoint
from bluesky_jit.training import Normalizer, Trainer

from .helpers import blobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# -- precision, stacks and the Noise2Inverse mean ------------------------------------------


def test_bfloat16_inference_is_close_to_float32(trained):
    rng = np.random.default_rng(6)
    truth = blobs(rng, 1, 48)[0]
    image = noisy(rng, truth)
    exact = Denoiser(build_model("unet"), source=trained)(image)
    fast = Denoiser(build_model("unet"), source=trained, infer_precision="bfloat16")
    low = fast(image)
    assert low.dtype == np.float32 and low.shape == image.shape
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    clean = (0.02 + 0.01 * truth).astype(np.float32)
    # the rounding is far below the error left by denoising
    assert np.sqrt(np.mean((low - exact) ** 2)) < 0.1 * np.sqrt(np.mean((exact - clean) ** 2))
    with pytest.raises(ConfigError, match="precision"):
        Denoiser(build_model("unet"), infer_precision="int8")


def test_stack_networks_take_frames_and_return_the_middle_one():
    model = build_model("unet3d", {"features": 2, "frames": 3, "residual": True}, seed=0)
    denoiser = Denoiser(model, normalizer=Normalizer(offset=0.01, scale=0.02))
    stack = np.random.default_rng(7).normal(size=(3, 21, 30)).astype(np.float32)
    out = denoiser(stack)  # residual network with zero head: the identity on the middle frame
    np.testing.assert_allclose(out, stack[1], atol=1e-6)
    with pytest.raises(ScanDataError, match=r"\(3, H, W\)"):
        denoiser(stack[:2])
    untrained = Denoiser(model)  # no normaliser: the middle frame, unchanged
    np.testing.assert_array_equal(untrained(stack), stack[1])


def test_denoise_mean_averages_the_split_inputs(trained):
    rng = np.random.default_rng(8)
    truth = blobs(rng, 1, 40)[0]
    halves = np.stack([noisy(rng, truth), noisy(rng, truth)])
    denoiser = Denoiser(build_model("unet"), source=trained)
    mean = denoiser.denoise_mean(halves)
    np.testing.assert_allclose(mean, 0.5 * (denoiser(halves[0]) + denoiser(halves[1])), rtol=1e-6)
    with pytest.raises(ScanDataError, match="denoise_mean"):
        denoiser.denoise_mean(halves[0])


def test_self_ensemble_averages_the_eight_symmetries(trained):
    rng = np.random.default_rng(9)
    truth = blobs(rng, 1, 32)[0]
    image = noisy(rng, truth)[:32, :24]  # not square; multiples of 8: no padding
    plain = Denoiser(build_model("unet"), source=trained)
    both = Denoiser(build_model("unet"), source=trained, self_ensemble=True)
    manual = np.mean(
        [np.rot90(plain(np.rot90(image[:, ::-1] if k >= 4 else image, k % 4)), -(k % 4))
         [:, ::-1 if k >= 4 else 1] for k in range(8)],
        axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(both(image), manual, rtol=1e-4, atol=1e-6)

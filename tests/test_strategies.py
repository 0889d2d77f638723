"""Online-learning strategies (seed 000, Fig. 10) and the trainer in its own process."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bluesky_jit.errors import CheckpointError, ConfigError
from bluesky_jit.inference import Denoiser
from bluesky_jit.models import build_model
from bluesky_jit.models.checkpoint import load_checkpoint
from bluesky_jit.pairs import ReplayBuffer, SequentialBuffer
from bluesky_jit.strategies import ProcessTrainer, make_buffer, make_trainer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pairs(rng, n, size=12):
    clean = rng.uniform(0, 1, (n, 1, 1, 1)) * np.ones((n, 1, size, size))
    u = clean + 0.3 * rng.standard_normal(clean.shape)
    v = clean + 0.3 * rng.standard_normal(clean.shape)
    return u.astype(np.float32), v.astype(np.float32)


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_buffers_of_the_strategies():
    assert type(make_buffer("queue", 8)) is ReplayBuffer
    assert type(make_buffer("sequential", 8)) is SequentialBuffer
    with pytest.raises(ConfigError, match="strategy"):
        make_buffer("lifo", 8)


def test_make_trainer_by_strategy(tmp_path):
    rng = np.random.default_rng(0)
    queue = make_trainer("queue", model_config={"features": 2}, capacity=32, batch_size=8)
    queue.buffer.push(*pairs(rng, 16))
    queue.step()
    path = queue.save(tmp_path / "pre.pt")
    frozen = make_trainer("frozen", checkpoint=path, capacity=32, batch_size=8)
    assert frozen.frozen and frozen.normalizer == queue.normalizer
    same = make_trainer("queue", model="unet", model_config={"features": 2}, checkpoint=path)
    assert same.warm_start is not None
    with pytest.raises(CheckpointError, match="msdnet"):  # holds a U-Net, not an MSD-Net
        make_trainer("frozen", model="msdnet", checkpoint=path, capacity=32, batch_size=8)
    with pytest.raises(CheckpointError, match="features"):
        make_trainer("frozen", model="unet", model_config={"features": 4}, checkpoint=path)
    with pytest.raises(CheckpointError, match="msdnet"):
        ProcessTrainer("msdnet", warm_start=path, capacity=32, batch_size=8)
    seq = make_trainer("sequential", model="unet3d", model_config={"features": 2}, batch_size=8)
    assert isinstance(seq.buffer, SequentialBuffer) and seq.buffer.item_ndim == 4
    with pytest.raises(ConfigError, match="checkpoint"):
        make_trainer("frozen")
    with pytest.raises(ConfigError, match="N_buffer"):
        make_trainer("queue", capacity=4, batch_size=8)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        make_trainer("frozen", checkpoint=bad)


@pytest.mark.timeout(90)
def test_trainer_in_its_own_process(tmp_path):
    rng = np.random.default_rng(1)
    config = {"features": 2}
    trainer = ProcessTrainer(
        "unet",
        config,
        capacity=64,
        batch_size=8,
        learning_rate=1e-3,
        metrics_every_s=0.1,
        checkpoint_dir=tmp_path,
    )
    denoiser = Denoiser(build_model("unet", config), source=trainer)
    image = np.random.default_rng(2).normal(size=(24, 24)).astype(np.float32)
    assert np.array_equal(denoiser(image), image)  # nothing trained yet: shown unchanged
    try:
        trainer.buffer.push(*pairs(rng, 32))
        trainer.add_holdout(*pairs(rng, 8))
        assert len(trainer.buffer) == 32  # counted here before the child reports
        trainer.start()
        assert wait_for(lambda: trainer.steps >= 10 and trainer.normalizer is not None)
        assert wait_for(lambda: trainer.metrics())
        # inference reads the newest weights without waiting for the training process
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            snap = trainer.snapshot()
            times.append(time.perf_counter() - t0)
        assert max(times) < 0.05
        out = denoiser(image)
        assert denoiser.weights_version == snap.version or denoiser.weights_version > 0
        assert out.shape == image.shape and not np.array_equal(out, image)
        assert 0 < trainer.evaluate() < 10
        assert {"alpha", "mse_input", "mse_output"} <= set(trainer.latest_quality)
    finally:
        trainer.stop()
    assert not trainer.running and trainer.error is None
    model, extra = load_checkpoint(tmp_path / "latest.pt", expected_name="unet")
    assert extra["step"] >= 10  # the child's Trainer wrote its last checkpoint
    path = trainer.save(tmp_path / "parent.pt")
    _, extra = load_checkpoint(path, expected_config=config)
    assert extra["normalizer"] == trainer.normalizer.to_dict()


@pytest.mark.timeout(60)
def test_process_trainer_reports_a_failure():
    trainer = ProcessTrainer("unet", {"features": 2}, capacity=16, batch_size=8)
    trainer.buffer.push(np.zeros((8, 1, 6, 6)), np.full((8, 1, 6, 6), np.nan))  # refused there
    trainer.start()
    assert wait_for(lambda: not trainer.running)
    trainer.stop()
    assert trainer.error is not None and "ScanDataError" in str(trainer.error)


def test_process_trainer_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="strategy"):
        ProcessTrainer("unet", strategy="lifo")
    with pytest.raises(ConfigError, match="warm_start"):
        ProcessTrainer("unet", strategy="frozen")
    with pytest.raises(ConfigError, match="unknown setting"):
        ProcessTrainer("unet", momentum=0.9)
    with pytest.raises(ConfigError, match="capacity"):
        ProcessTrainer("unet", capacity=8, batch_size=32)
    with pytest.raises(ConfigError, match="Unknown model"):
        ProcessTrainer("resnet")

"""Accuracy alpha, the normaliser and the just-in-time trainer."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import torch

from bluesky_jit import training
from bluesky_jit.buffers import ReplayBuffer, SequentialBuffer
from bluesky_jit.errors import CheckpointError, ConfigError
from bluesky_jit.inference import Denoiser
from bluesky_jit.models import build_model
from bluesky_jit.models.checkpoint import load_checkpoint
from bluesky_jit.process_trainer import ProcessTrainer
from bluesky_jit.training import Normalizer, OnlineTrainer, Trainer, alpha

from . import helpers


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(rng, n, size, k=5):
    """Smooth random images: sums of Gaussian blobs, shape (n, 1, size, size), values ~[0, 2]."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0, size, (2, n, k, 1, 1))
    width = rng.uniform(2, 5, (n, k, 1, 1))
    amp = rng.uniform(0.5, 1, (n, k, 1, 1))
    images = (amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))).sum(axis=1)
    return images[:, None]


def noise2noise_pairs(rng, n, size=20, sigma=0.3, scale=0.01, offset=0.02):
    """Clean images and two independent noisy copies, at reconstruction-like magnitudes."""
    clean = blobs(rng, n, size)
    u = clean + sigma * rng.standard_normal(clean.shape)
    v = clean + sigma * rng.standard_normal(clean.shape)
    return tuple((offset + scale * x).astype(np.float32) for x in (clean, u, v))


# -- alpha --------------------------------------------------------------------------------


def test_alpha_of_identity_is_one():
    rng = np.random.default_rng(0)
    _, u, v = noise2noise_pairs(rng, 16)
    assert alpha(u, u, v) == pytest.approx(1.0, abs=1e-12)


def test_alpha_of_an_oracle_is_one_half():
    rng = np.random.default_rng(1)
    clean, u, v = noise2noise_pairs(rng, 64, size=32)
    assert alpha(clean, u, v) == pytest.approx(0.5, abs=0.02)  # Graas et al. 2023, eq. 4
    assert alpha(torch.from_numpy(clean), torch.from_numpy(u), torch.from_numpy(v)) == (
        pytest.approx(alpha(clean, u, v), rel=1e-12)
    )


def test_alpha_is_invariant_to_normalisation():
    rng = np.random.default_rng(2)
    clean, u, v = noise2noise_pairs(rng, 8)
    denoised = 0.5 * (clean + u)

    def t(x):
        return (x - 0.02) / 0.003

    assert alpha(t(denoised), t(u), t(v)) == pytest.approx(alpha(denoised, u, v), rel=1e-6)


def test_alpha_edge_cases():
    x = np.ones((3, 1, 4, 4))
    assert math.isnan(alpha(x, x, x))  # u == v everywhere: undefined
    with pytest.raises(ConfigError, match="one shape"):
        alpha(x, x, x[:2])


# -- normaliser ---------------------------------------------------------------------------


def test_normalizer_fit_and_inverse():
    rng = np.random.default_rng(3)
    _, u, v = noise2noise_pairs(rng, 10)
    norm = Normalizer.fit(u, v)
    both = norm(torch.from_numpy(np.concatenate([u, v])).double())
    assert float(both.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(both.std(unbiased=False)) == pytest.approx(1.0, rel=1e-9)
    x = torch.from_numpy(u)
    torch.testing.assert_close(norm.inverse(norm(x)), x)
    assert Normalizer.from_dict(norm.to_dict()) == norm
    assert Normalizer.fit(np.full((2, 3), 7.0)) == Normalizer(offset=7.0, scale=1.0)


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": -1.0}, {"offset": math.nan}])
def test_normalizer_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        Normalizer(**kwargs)
    with pytest.raises(ConfigError):
        Normalizer.from_dict({"offset": 1.0})


# -- trainer ------------------------------------------------------------------------------


def make_trainer(rng, *, n_train=256, n_holdout=32, features=8, **kwargs):
    model = build_model("unet", {"features": features}, seed=0)
    buffer = ReplayBuffer(320, rng=np.random.default_rng(0))
    trainer = Trainer(model, buffer, **kwargs)
    if n_train:
        buffer.push(*noise2noise_pairs(rng, n_train)[1:])
    if n_holdout:
        trainer.add_holdout(*noise2noise_pairs(rng, n_holdout)[1:])
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"holdout_size": 2.5}, "holdout_size"),
        ({"checkpoint_every_s": 0}, "checkpoint_every_s"),
    ],
)
def test_trainer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(build_model("unet", {"features": 2}), ReplayBuffer(4), **kwargs)


def test_checkpointing_needs_a_registry_model(tmp_path):
    with pytest.raises(ConfigError, match="build_model"):
        Trainer(torch.nn.Conv2d(1, 1, 3), ReplayBuffer(4), checkpoint_dir=tmp_path)


def test_noise2noise_training_lowers_holdout_alpha():
    """A short Noise2Noise run on smooth blobs denoises held-out pairs (alpha well below 1)."""
    rng = np.random.default_rng(4)
    trainer = make_trainer(rng, learning_rate=1e-3, batch_size=16)
    before = trainer.evaluate()
    losses = [trainer.step() for _ in range(150)]
    after = trainer.evaluate()
    assert trainer.steps == 150
    assert trainer.normalizer is not None
    assert trainer.normalizer.offset == pytest.approx(0.02 + 0.01 * 0.9, abs=0.01)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert after < 0.8 < before  # an untrained plain U-Net is worse than the identity
    assert len(trainer.buffer) == 256 and len(trainer.holdout) == 32  # hold-out kept apart


def test_weights_are_versioned_copies():
    rng = np.random.default_rng(5)
    trainer = make_trainer(rng, n_train=8, features=2, batch_size=4)
    version, state = trainer.weights()
    assert version == 0 and trainer.snapshot().normalizer is None
    frozen = {k: t.clone() for k, t in state.items()}
    trainer.step()
    trainer.step()
    new_version, new_state = trainer.weights()
    assert new_version == 2 and trainer.snapshot().normalizer == trainer.normalizer is not None
    assert all(torch.equal(state[k], frozen[k]) for k in state)  # old snapshot untouched
    assert any(not torch.equal(new_state[k], frozen[k]) for k in state)
    for k, t in trainer.model.state_dict().items():
        assert torch.equal(t, new_state[k]) and t.data_ptr() != new_state[k].data_ptr()


def test_non_finite_loss_raises_and_keeps_weights():
    rng = np.random.default_rng(6)
    trainer = make_trainer(
        rng, n_train=8, features=2, batch_size=4, loss_fn=lambda a, b: (a - b).sum() * math.inf
    )
    before = {k: t.clone() for k, t in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="finite"):
        trainer.step()
    assert trainer.steps == 0
    assert all(torch.equal(t, before[k]) for k, t in trainer.model.state_dict().items())


def wait_for(predicate, timeout=10.0):
    return helpers.wait_for(predicate, timeout, "the trainer")


@pytest.mark.timeout(30)
def test_background_loop_trains_records_metrics_and_checkpoints(tmp_path):
    rng = np.random.default_rng(7)
    trainer = make_trainer(
        rng,
        n_train=0,
        features=2,
        batch_size=8,
        metrics_every_s=0.05,
        checkpoint_dir=tmp_path,
        checkpoint_every_s=0.05,
    )
    trainer.start()
    assert trainer.running
    time.sleep(0.1)
    assert trainer.steps == 0  # waits for a full batch
    trainer.buffer.push(*noise2noise_pairs(rng, 8)[1:])
    assert wait_for(lambda: len(trainer.metrics()) >= 3 and (tmp_path / "latest.pt").exists())
    first = trainer.pop_metrics()
    assert wait_for(lambda: len(trainer.metrics()) > len(first))
    trainer.stop()
    assert not trainer.running and trainer.error is None
    rows = trainer.metrics()
    second = trainer.pop_metrics()
    assert first + second == rows and trainer.pop_metrics() == []
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert set(rows[0]) >= {"step", "time", "loss", "alpha", "steps_per_second"}
    assert 0 < rows[-1]["alpha"] < 10 and rows[-1]["loss"] > 0
    assert trainer.steps_per_second > 0
    model, extra = load_checkpoint(tmp_path / "latest.pt")
    assert extra["step"] == trainer.steps  # stop() wrote the last weights
    assert Normalizer.from_dict(extra["normalizer"]) == trainer.normalizer
    version, state = trainer.weights()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


@pytest.mark.timeout(30)
def test_an_error_in_the_loop_is_kept_and_logged(caplog):
    rng = np.random.default_rng(8)

    def broken_loss(a, b):
        raise RuntimeError("boom")

    trainer = make_trainer(rng, n_train=8, features=2, batch_size=4, loss_fn=broken_loss)
    with caplog.at_level(logging.ERROR, logger="bluesky_jit.training"):
        trainer.start()
        assert wait_for(lambda: not trainer.running)
    trainer.stop()
    assert isinstance(trainer.error, RuntimeError) and "boom" in str(trainer.error)
    assert "training thread stopped" in caplog.text


@pytest.mark.timeout(30)
def test_throttled_loop_and_save(tmp_path):
    rng = np.random.default_rng(9)
    trainer = make_trainer(rng, n_train=8, features=2, batch_size=4, max_train_steps_per_s=20)
    trainer.start()
    time.sleep(0.5)
    trainer.stop()
    assert 2 <= trainer.steps <= 15
    path = trainer.save(tmp_path / "manual.pt")
    _, extra = load_checkpoint(path, expected_name="unet")
    assert extra["step"] == trainer.steps and extra["batch_size"] == 4


# -- strategies, precision, warm start ----------------------------------------------------


def test_buffer_smaller_than_a_batch_is_refused():
    with pytest.raises(ConfigError, match="N_buffer"):
        Trainer(build_model("unet", {"features": 2}), ReplayBuffer(16), batch_size=32)


def test_bfloat16_training_lowers_holdout_alpha():
    rng = np.random.default_rng(10)
    trainer = make_trainer(
        rng, features=4, learning_rate=3e-3, batch_size=16, train_precision="bfloat16"
    )
    before = trainer.evaluate()
    for _ in range(80):
        trainer.step()
    assert trainer.evaluate() < 0.8 < before
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    with pytest.raises(ConfigError, match="precision"):
        make_trainer(rng, train_precision="float16")


def test_auto_precision_follows_the_cpu_flags(tmp_path):
    from bluesky_jit.training import native_bfloat16_cpu, resolve_precision

    cpus = {
        "zen4": "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n",
        "sapphire": "flags\t\t: fpu avx512f amx_tile amx_bf16\n",
        "skylake": "flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512dq\n",
        "neoverse": "Features\t: fp asimd sve bf16 i8mm\n",
    }
    native = {}
    for name, text in cpus.items():
        (tmp_path / name).write_text("processor\t: 0\n" + text)
        native[name] = native_bfloat16_cpu(tmp_path / name)
    assert native == {"zen4": True, "sapphire": True, "skylake": False, "neoverse": True}
    assert native_bfloat16_cpu(tmp_path / "missing") is False
    expected = "bfloat16" if native_bfloat16_cpu() else "float32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("auto", "cuda") == "float32"
    assert resolve_precision("float32") == "float32"
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("half")


def test_augmentation_keeps_pairs_aligned_and_covers_the_eight_symmetries():
    from bluesky_jit.training import _turn

    u = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = set()
    for k in range(8):
        a, b = _turn(u, k), _turn(u + 100, k)
        assert torch.equal(b - a, torch.full_like(a, 100.0))
        seen.add(tuple(a.flatten().tolist()))
    assert len(seen) == 8
    rng = np.random.default_rng(11)
    trainer = make_trainer(rng, features=4, learning_rate=3e-3, batch_size=16, augment=True)
    for _ in range(80):
        trainer.step()
    assert trainer.evaluate() < 0.8


@pytest.mark.timeout(30)
def test_sequential_buffer_trains_on_every_pair_once():
    rng = np.random.default_rng(12)
    buffer = SequentialBuffer(64, rng=np.random.default_rng(0))
    trainer = Trainer(build_model("unet", {"features": 2}, seed=0), buffer, batch_size=8)
    buffer.push(*noise2noise_pairs(rng, 36)[1:])
    trainer.start()
    assert wait_for(lambda: trainer.steps == 4)  # 36 pairs: 4 full batches
    time.sleep(0.2)
    assert trainer.steps == 4 and len(buffer) == 4  # the optimizer waits for new pairs
    buffer.push(*noise2noise_pairs(rng, 4)[1:])
    assert wait_for(lambda: trainer.steps == 5)
    trainer.stop()
    assert trainer.error is None


@pytest.mark.timeout(30)
def test_warm_start_and_the_frozen_baseline(tmp_path):
    rng = np.random.default_rng(13)
    first = make_trainer(rng, features=4, learning_rate=1e-3, batch_size=16)
    for _ in range(20):
        first.step()
    path = first.save(tmp_path / "run1.pt")

    buffer = ReplayBuffer(320)
    warm = Trainer.from_checkpoint(path, buffer, batch_size=16, expected_name="unet")
    assert warm.normalizer == first.normalizer  # the weights keep their meaning
    assert warm.warm_start == {"path": str(path), "step": 20}
    for k, t in first.weights()[1].items():
        assert torch.equal(warm.model.state_dict()[k], t)
    buffer.push(*noise2noise_pairs(rng, 64)[1:])
    warm.step()  # continues training
    assert warm.steps == 1

    frozen = Trainer.from_checkpoint(
        path, ReplayBuffer(320), batch_size=16, frozen=True, metrics_every_s=0.05
    )
    frozen.buffer.push(*noise2noise_pairs(rng, 64)[1:])
    frozen.add_holdout(*noise2noise_pairs(rng, 16)[1:])
    with pytest.raises(ConfigError, match="frozen"):
        frozen.step()
    before = {k: t.clone() for k, t in frozen.model.state_dict().items()}
    frozen.start()
    assert wait_for(lambda: len(frozen.metrics()) >= 2)
    frozen.stop()
    assert frozen.steps == 0 and frozen.error is None
    assert all(torch.equal(t, before[k]) for k, t in frozen.model.state_dict().items())
    assert all(0 < row["alpha"] < 10 for row in frozen.metrics())  # evaluated all along


def test_evaluate_details_and_stacks():
    rng = np.random.default_rng(14)
    model = build_model("unet3d", {"features": 2, "frames": 3, "residual": True}, seed=0)
    buffer = ReplayBuffer(64, item_ndim=4)
    trainer = Trainer(model, buffer, batch_size=8)
    clean, u, v = noise2noise_pairs(rng, 16)
    stack_u = np.repeat(u[:, :, None], 3, axis=2)  # (16, 1, 3, 20, 20)
    trainer.add_holdout(stack_u, v[:, :, None])
    details = trainer.evaluate_details()
    assert details["alpha"] == pytest.approx(1.0, abs=1e-6)  # residual + zero head: identity
    assert details["mse_input"] == pytest.approx(float(np.mean((u - v) ** 2)), rel=1e-3)
    assert details["mse_output"] == pytest.approx(details["mse_input"], rel=1e-3)
    buffer.push(stack_u, v[:, :, None])
    trainer.step()
    assert trainer.steps == 1


@pytest.mark.timeout(30)
def test_loop_threads_quality_and_final_row():
    rng = np.random.default_rng(15)
    before = torch.get_num_threads()
    trainer = make_trainer(rng, features=2, batch_size=8, num_threads=1, metrics_every_s=0.05)
    trainer.start()
    assert wait_for(lambda: len(trainer.metrics()) >= 2)
    trainer.stop()
    assert torch.get_num_threads() == before  # set in the loop's thread only
    quality = trainer.latest_quality
    assert set(quality) == {"step", "time", "alpha", "mse_input", "mse_output"}
    row = trainer.final_row(elapsed_s=1.0)
    assert set(row) == set(trainer.metrics()[-1])  # same keys as the loop's rows
    with pytest.raises(ConfigError, match="num_threads"):
        make_trainer(rng, num_threads=0)


def test_weight_averaging_publishes_and_evaluates_the_average():
    rng = np.random.default_rng(16)
    trainer = make_trainer(rng, features=2, batch_size=8, learning_rate=1e-2, average_weights=0.9)
    first = {k: t.clone() for k, t in trainer.model.state_dict().items()}
    trainer.step()
    version, state = trainer.weights()
    live = trainer.model.state_dict()
    key = "head.weight"
    assert version == 1 and not torch.equal(state[key], live[key])  # the average, not the live
    for name, tensor in live.items():  # after step 1 the decay is (1 + 1) / (10 + 1)
        expected = first[name] + (tensor - first[name]) * (1 - 2 / 11)
        torch.testing.assert_close(state[name], expected)
    # after n steps the decay is min(0.9, (1 + n) / (10 + n)): a plain mean of the start
    for _ in range(5):
        trainer.step()
    w = trainer.weights()[1][key]
    assert not torch.equal(w, first[key]) and not torch.equal(w, trainer.model.state_dict()[key])
    assert 0 < trainer.evaluate() < 10
    with pytest.raises(ConfigError, match="average"):
        make_trainer(rng, average_weights=1.0)


def test_make_trainer_by_online_strategy(tmp_path):
    rng = np.random.default_rng(0)
    queue = training.make_trainer(
        "queue", model_config={"features": 2}, buffer_capacity=32, batch_size=8
    )
    queue.buffer.push(*noise2noise_pairs(rng, 16)[1:])
    queue.step()
    path = queue.save(tmp_path / "pre.pt")
    frozen = training.make_trainer("frozen", warm_start=path, buffer_capacity=32, batch_size=8)
    assert frozen.frozen and frozen.normalizer == queue.normalizer
    same = training.make_trainer(
        "queue", model="unet", model_config={"features": 2}, warm_start=path
    )
    assert same.warm_start is not None
    with pytest.raises(CheckpointError, match="msdnet"):  # holds a U-Net, not an MSD-Net
        training.make_trainer(
            "frozen", model="msdnet", warm_start=path, buffer_capacity=32, batch_size=8
        )
    with pytest.raises(CheckpointError, match="features"):
        training.make_trainer("frozen", model="unet", model_config={"features": 4}, warm_start=path)
    with pytest.raises(CheckpointError, match="msdnet"):
        ProcessTrainer("msdnet", warm_start=path, buffer_capacity=32, batch_size=8)
    seq = training.make_trainer(
        "sequential", model="unet3d", model_config={"features": 2}, batch_size=8
    )
    assert isinstance(seq.buffer, SequentialBuffer) and seq.buffer.item_ndim == 4
    with pytest.raises(ConfigError, match="checkpoint"):
        training.make_trainer("frozen")
    with pytest.raises(ConfigError, match="N_buffer"):
        training.make_trainer("queue", buffer_capacity=4, batch_size=8)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        training.make_trainer("frozen", warm_start=bad)


# -- the OnlineTrainer seam: one suite, both trainers -----------------------------------------


@pytest.fixture(params=["thread", "process"])
def online_trainer(request, tmp_path):
    settings = dict(batch_size=8, learning_rate=1e-3, metrics_every_s=0.1, checkpoint_dir=tmp_path)
    if request.param == "thread":
        trainer = training.make_trainer("queue", model_config={"features": 2}, **settings)
    else:
        trainer = ProcessTrainer("unet", {"features": 2}, buffer_capacity=320, **settings)
    yield trainer
    trainer.stop()


@pytest.mark.timeout(90)
def test_online_trainer_contract(online_trainer, tmp_path):
    trainer, rng = online_trainer, np.random.default_rng(1)
    assert isinstance(trainer, OnlineTrainer)
    denoiser = Denoiser(build_model("unet", {"features": 2}), source=trainer)
    image = np.random.default_rng(2).normal(size=(24, 24)).astype(np.float32)
    assert np.array_equal(denoiser(image), image)  # nothing trained yet: shown unchanged
    trainer.buffer.push(*noise2noise_pairs(rng, 32)[1:])
    trainer.add_holdout(*noise2noise_pairs(rng, 8)[1:])
    assert len(trainer.buffer) == 32 and trainer.buffer.pushed == 32
    trainer.start()
    assert wait_for(lambda: trainer.steps >= 10 and trainer.normalizer is not None, 60)
    assert wait_for(lambda: trainer.metrics(), 60) and trainer.running
    times = []  # inference reads the newest weights without waiting for training
    for _ in range(20):
        t0 = time.perf_counter()
        snap = trainer.snapshot()
        times.append(time.perf_counter() - t0)
    assert max(times) < 0.05 and trainer.weights()[0] >= snap.version
    out = denoiser(image)
    assert out.shape == image.shape and not np.array_equal(out, image)
    assert 0 < trainer.evaluate() < 10 and trainer.steps_per_second >= 0
    assert {"alpha", "mse_input", "mse_output"} <= set(trainer.latest_quality)
    assert trainer.pop_metrics() and trainer.paused_s >= 0
    trainer.stop()
    assert not trainer.running and trainer.error is None
    row = trainer.final_row(elapsed_s=1.0)
    assert set(row) == set(trainer.metrics()[-1]) and row["step"] == trainer.steps
    _, extra = load_checkpoint(tmp_path / "latest.pt", expected_name="unet")
    assert extra["step"] >= 10  # written on stop
    _, extra = load_checkpoint(trainer.save(tmp_path / "saved.pt"), expected_config={"features": 2})
    assert extra["normalizer"] == trainer.normalizer.to_dict()
    trainer.clear_holdout()
    trainer.buffer.clear()
    assert trainer.buffer.pushed == 0

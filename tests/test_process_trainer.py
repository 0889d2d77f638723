"""The trainer in its own process; the suite both trainers share is in test_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_jit.errors import ConfigError
from bluesky_jit.process_trainer import ProcessTrainer

from . import helpers


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_for(predicate, timeout=20.0):
    return helpers.wait_for(predicate, timeout, "the process trainer")


@pytest.mark.timeout(60)
def test_process_trainer_reports_a_failure():
    trainer = ProcessTrainer("unet", {"features": 2}, buffer_capacity=16, batch_size=8)
    trainer.buffer.push(np.zeros((8, 1, 6, 6)), np.full((8, 1, 6, 6), np.nan))  # refused there
    trainer.start()
    assert wait_for(lambda: not trainer.running)
    trainer.stop()
    assert trainer.error is not None and "ScanDataError" in str(trainer.error)


def test_process_trainer_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="strategy"):
        ProcessTrainer("unet", online_strategy="lifo")
    with pytest.raises(ConfigError, match="warm_start"):
        ProcessTrainer("unet", online_strategy="frozen")
    with pytest.raises(ConfigError, match="unknown setting"):
        ProcessTrainer("unet", momentum=0.9)
    with pytest.raises(ConfigError, match="capacity"):
        ProcessTrainer("unet", buffer_capacity=8, batch_size=32)
    with pytest.raises(ConfigError, match="Unknown model"):
        ProcessTrainer("resnet")

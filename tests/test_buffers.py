"""The pair buffers: the capacity queue (Graas et al. 2023, Fig. 6) and the sequential one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bluesky_jit.buffers import ReplayBuffer, SequentialBuffer, make_buffer
from bluesky_jit.errors import ConfigError, EmptyBufferError, ScanDataError


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tagged(ids, p=4):
    """Pairs whose patches are constant: u = id, v = id + 0.5."""
    ids = np.asarray(ids, dtype=np.float32)
    u = np.broadcast_to(ids[:, None, None, None], (len(ids), 1, p, p)).copy()
    return u, u + 0.5


def ids_of(u):
    return u[:, 0, 0, 0].round().long().tolist()


@pytest.mark.parametrize("capacity", [0, -3, 2.0, True, None])
def test_capacity_must_be_positive_int(capacity):
    with pytest.raises(ConfigError, match="capacity"):
        ReplayBuffer(capacity)


def test_rng_must_be_generator():
    with pytest.raises(ConfigError, match="Generator"):
        ReplayBuffer(4, rng=np.random.RandomState(0))


@pytest.mark.parametrize("trial", range(5))
def test_keeps_capacity_and_drops_oldest(trial):
    rng = np.random.default_rng(trial)
    capacity = int(rng.integers(1, 12))
    buf = ReplayBuffer(capacity, rng=rng)
    pushed = 0
    while pushed < 40:
        n = int(rng.integers(1, 2 * capacity + 2))  # single pairs and batches, some > capacity
        u, v = tagged(range(pushed, pushed + n))
        if n == 1 and rng.random() < 0.5:
            buf.push(u[0], v[0])  # one (C, p, p) pair
        else:
            buf.push(u, v)
        pushed += n
        assert len(buf) == min(pushed, capacity)
        assert buf.pushed == pushed
        su, sv = buf.snapshot()
        assert ids_of(su) == list(range(max(0, pushed - capacity), pushed))  # oldest first
        assert torch.equal(sv - su, torch.full_like(su, 0.5))


def test_sample_shapes_dtype_and_copies():
    buf = ReplayBuffer(8, rng=np.random.default_rng(0))
    u, v = tagged(range(8))
    buf.push(torch.from_numpy(u).double(), v)  # torch float64 and numpy float32 in
    su, sv = buf.sample(5)
    assert su.shape == sv.shape == (5, 1, 4, 4)
    assert su.dtype == sv.dtype == torch.float32
    kept = su.clone()
    buf.push(*tagged(range(100, 108)))  # overwrites every slot
    assert torch.equal(su, kept)  # earlier batches are not views of the ring
    assert buf.item_shapes == ((1, 4, 4), (1, 4, 4))


def test_sampling_is_uniform_and_without_replacement_within_a_batch():
    n, batch, draws = 10, 4, 3000
    buf = ReplayBuffer(n, rng=np.random.default_rng(1))
    buf.push(*tagged(range(100, 100 + 2 * n)))  # only the newest n = 10 remain
    counts = np.zeros(n)
    for _ in range(draws):
        u, v = buf.sample(batch)
        ids = ids_of(u)
        assert len(set(ids)) == batch  # no pair twice in one batch
        assert torch.equal(v - u, torch.full_like(u, 0.5))  # pairs stay together
        for i in ids:
            counts[i - 110] += 1  # IndexError if an evicted pair came back
    expected = draws * batch / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_sampling_with_replacement_when_fewer_pairs_than_batch():
    buf = ReplayBuffer(32, rng=np.random.default_rng(2))
    buf.push(*tagged([7, 8, 9]))
    u, _ = buf.sample(16)
    assert u.shape[0] == 16
    assert set(ids_of(u)) <= {7, 8, 9}


def test_sample_uses_the_given_rng():
    buf = ReplayBuffer(50)
    buf.push(*tagged(range(50)))
    a, _ = buf.sample(8, rng=np.random.default_rng(5))
    b, _ = buf.sample(8, rng=np.random.default_rng(5))
    assert torch.equal(a, b)


def test_empty_buffer_raises():
    buf = ReplayBuffer(4)
    with pytest.raises(EmptyBufferError, match="empty"):
        buf.sample(2)
    with pytest.raises(LookupError):
        buf.snapshot()


def test_bad_pushes_raise_and_keep_nothing():
    buf = ReplayBuffer(4)
    buf.push(*tagged([1, 2]))
    with pytest.raises(ScanDataError, match="same patch size"):
        buf.push(*tagged([3], p=5))
    with pytest.raises(ScanDataError, match="one target per input"):
        buf.push(tagged([3, 4])[0], tagged([3])[1])
    u, v = tagged([3, 4])
    v[1, 0, 0, 0] = np.nan
    with pytest.raises(ScanDataError, match="NaN"):
        buf.push(u, v)
    with pytest.raises(ScanDataError, match="channel axis"):
        buf.push(np.zeros((4, 4)), np.zeros((4, 4)))
    assert len(buf) == 2 and buf.pushed == 2
    buf.clear()
    assert len(buf) == 0 and buf.item_shapes is None
    buf.push(*tagged([3], p=5))  # a new patch size after clear()
    assert buf.item_shapes == ((1, 5, 5), (1, 5, 5))


def test_read_only_and_big_endian_arrays_are_accepted():
    u, v = tagged(range(3))
    u = u.astype(">f4")
    u.flags.writeable = False
    buf = ReplayBuffer(3)
    buf.push(u, v)
    assert ids_of(buf.snapshot()[0]) == [0, 1, 2]


@pytest.mark.timeout(20)
def test_push_and_sample_from_two_threads():
    buf = ReplayBuffer(16, rng=np.random.default_rng(3))
    total = 2000
    errors = []

    def pusher():
        try:
            for start in range(0, total, 4):
                buf.push(*tagged(range(start, start + 4), p=6))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    buf.push(*tagged(range(-4, 0), p=6))
    thread = threading.Thread(target=pusher)
    thread.start()
    seen = 0
    while thread.is_alive() or seen == 0:
        u, v = buf.sample(8)
        # no torn pairs: every patch constant, and v belongs to the same pair as u
        assert torch.equal(u, u[:, :, :1, :1].expand_as(u))
        assert torch.equal(v - u, torch.full_like(u, 0.5))
        assert max(ids_of(u)) < total
        seen += 1
    thread.join()
    assert not errors
    assert buf.pushed == total + 4
    assert ids_of(buf.snapshot()[0]) == list(range(total - 16, total))


# -- the no-buffer baseline, shape changes -------------------------------------------------


def test_sequential_buffer_hands_out_every_pair_once_in_order():
    buf = SequentialBuffer(10, rng=np.random.default_rng(0))
    buf.push(*tagged(range(6)))
    assert len(buf) == 6
    u, v = buf.sample(4)
    assert ids_of(u) == [0, 1, 2, 3] and torch.equal(v - u, torch.full_like(u, 0.5))
    assert len(buf) == 2
    with pytest.raises(EmptyBufferError, match="unused pairs"):
        buf.sample(4)  # only 2 waiting: the optimizer idles (Graas et al. 2023, Topic III)
    buf.push(*tagged(range(6, 20)))  # 16 waiting > capacity 10: the oldest drop out
    assert len(buf) == 10 and buf.pushed == 20
    assert ids_of(buf.sample(5)[0]) == [10, 11, 12, 13, 14]
    assert ids_of(buf.snapshot()[0]) == [15, 16, 17, 18, 19]  # what still waits


def test_buffer_can_start_over_when_the_patch_size_changes():
    buf = ReplayBuffer(8, on_shape_change="clear")
    buf.push(*tagged(range(5), p=4))
    buf.push(*tagged(range(5, 7), p=6))  # the patch size was changed during the run
    assert len(buf) == 2 and buf.item_shapes == ((1, 6, 6), (1, 6, 6))
    assert ids_of(buf.snapshot()[0]) == [5, 6]
    with pytest.raises(ConfigError, match="on_shape_change"):
        ReplayBuffer(8, on_shape_change="ignore")


def test_stacks_with_one_target_frame():
    buf = ReplayBuffer(4, item_ndim=4)
    buf.push(np.zeros((3, 1, 5, 8, 8)), np.ones((3, 1, 1, 8, 8)))  # Z5 / T5 pairs
    u, v = buf.sample(2)
    assert u.shape == (2, 1, 5, 8, 8) and v.shape == (2, 1, 1, 8, 8)


def test_buffers_of_the_online_strategies():
    assert type(make_buffer("queue", 8)) is ReplayBuffer
    assert type(make_buffer("sequential", 8)) is SequentialBuffer
    with pytest.raises(ConfigError, match="strategy"):
        make_buffer("lifo", 8)

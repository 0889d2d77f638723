"""Noise2Inverse maths: X:1 and 1:X pairs and inputs from K splits (Hendriksen et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_jit import noise2inverse
from bluesky_jit.errors import ConfigError


@pytest.mark.parametrize("k", [2, 3, 5])
def test_pairs_x1_and_1x(k):
    m = 400
    recons = np.arange(k, dtype=np.float32)[:, None, None, None] * np.ones((k, m, 2, 2))
    j = np.random.default_rng(0).integers(k, size=m)
    u, v = noise2inverse.pairs(recons, j, "X:1")
    total = k * (k - 1) / 2
    # target: one split j; input: the mean of the other K - 1
    np.testing.assert_allclose(u * (k - 1) + v, total)
    assert set(np.unique(v)) == set(range(k))  # every split serves as target
    u2, v2 = noise2inverse.pairs(recons, j, "1:X")
    np.testing.assert_allclose(u2, v)  # the same j: roles swapped
    np.testing.assert_allclose(v2, u)
    with pytest.raises(ConfigError, match="strategy"):
        noise2inverse.pairs(recons, j, "2:2")
    with pytest.raises(ConfigError, match="at least 2"):
        noise2inverse.pairs(recons[:1], j, "X:1")


def test_inputs():
    r = np.stack([np.full((3, 3), float(j)) for j in range(4)])
    x1 = noise2inverse.inputs(r, "X:1")
    np.testing.assert_allclose(x1[:, 0, 0], [(6 - j) / 3 for j in range(4)])
    np.testing.assert_allclose(noise2inverse.inputs(r, "1:X"), r)
    # with K = 2 both give the even/odd halves (Graas et al. 2023), swapped for X:1, exactly
    assert np.array_equal(noise2inverse.inputs(r[:2], "X:1"), r[:2][::-1])

"""Plain helpers shared by the tests (fixtures are in conftest.py; phantoms in phantom_utils.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str = "the condition", interval=0.05
) -> bool:
    """Return True once ``predicate()`` is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return True


@contextmanager
def run_engine() -> Iterator:
    """A bluesky RunEngine on its own event loop; halted, its thread joined, its loop closed."""
    from bluesky import RunEngine
    from bluesky.utils import TransitionError

    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    try:
        yield engine
    finally:
        if engine.state not in ("idle", "panicked"):
            try:
                engine.halt()
            except TransitionError:
                pass
        loop.call_soon_threadsafe(loop.stop)
        engine._th.join()
        loop.close()


def blobs(rng: np.random.Generator, n: int, size: int, k: int = 5) -> np.ndarray:
    """Smooth random images, shape (n, size, size), values ~[0, 2] (k blobs per 20x20)."""
    k = max(k, k * size * size // 400)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0, size, (2, n, k, 1, 1))
    width = rng.uniform(2, 5, (n, k, 1, 1))
    amp = rng.uniform(0.5, 1, (n, k, 1, 1))
    return (amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))).sum(axis=1)

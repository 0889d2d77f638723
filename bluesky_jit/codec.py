"""Documents as bytes without pickle: msgpack, with numpy arrays of numbers kept.

One encoding for everything bluesky-jit sends between processes: the 0MQ
bus (:func:`bluesky_jit.apps.listen.zmq_serializer`) and the pipe to the worker
process (:mod:`bluesky_jit.worker_process`). Decoding builds only plain
values and numeric arrays, so no code from the sender ever runs.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

NUMPY_EXT = 42
"""msgpack extension type of a numpy array: ``[dtype.str, shape, bytes]``."""
_SAFE_KINDS = frozenset("biufc")  # bool, integers, floats, complex: no objects


def packb(value: Any) -> bytes:
    """Encode plain values, numpy arrays and scalars (tuples and sets become lists)."""
    return msgpack.packb(value, default=_pack_numpy, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The inverse of :func:`packb`; raises ``ValueError`` on anything else (pickle too)."""
    return msgpack.unpackb(data, ext_hook=_unpack_numpy, raw=False, strict_map_key=False)


def _pack_numpy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        payload = msgpack.packb([data.dtype.str, list(data.shape), data.tobytes()])
        return msgpack.ExtType(NUMPY_EXT, payload)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot encode a {type(value).__name__}: plain values and arrays only")


def _unpack_numpy(code: int, payload: bytes) -> Any:
    if code != NUMPY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}")
    dtype_str, shape, raw = msgpack.unpackb(payload, raw=False)
    dtype = np.dtype(str(dtype_str))
    if dtype.kind not in _SAFE_KINDS:
        raise ValueError(f"refused an array of dtype {dtype_str!r}: numbers only")
    return np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in shape]).copy()

"""Errors raised by bluesky_jit.

Every error subclasses a builtin as well, so callers can catch either
``BlueskyJitError`` or the builtin they already expect. Messages say what was
expected, what came, and how to fix it.
"""


class BlueskyJitError(Exception):
    """Base class of every bluesky_jit error."""


class GeometryError(BlueskyJitError, ValueError):
    """Scan geometry is missing, inconsistent or unsupported."""


class ScanDataError(BlueskyJitError, ValueError):
    """A document or frame does not fit the scan (shape, NaN, missing reading)."""


class ConfigError(BlueskyJitError, ValueError):
    """A setting has the wrong type or value."""


class CheckpointError(BlueskyJitError, ValueError):
    """A checkpoint cannot be loaded into the requested model."""


class CatalogError(BlueskyJitError, RuntimeError):
    """The catalog cannot be started, reached or written."""


class RunNotFoundError(BlueskyJitError, LookupError):
    """No run with this uid (or scan id) in the catalog."""


class NotTomographyError(BlueskyJitError, ValueError):
    """The run is not a tomography scan (no ``tomo`` block, no FXI keys)."""


class BrokerError(BlueskyJitError, ConnectionError):
    """A 0MQ proxy or Kafka broker cannot be reached or used."""


class NotDerivedError(BlueskyJitError, ValueError):
    """The run is not a derived run of bluesky_jit."""


class TrainerProcessError(BlueskyJitError, RuntimeError):
    """The training process failed (its traceback is in the message)."""


class EmptyBufferError(BlueskyJitError, LookupError):
    """A batch was requested from a buffer that holds no pairs yet."""

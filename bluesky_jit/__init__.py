"""bluesky_jit: live just-in-time denoising of tomography scans, as a Bluesky plugin.

The package follows the data path::

    ingest -> projections -> geometry/reconstruction -> pairs -> models/training
    -> inference -> emit -> catalog

The face: ``from bluesky_jit import JitProcess, JitCallback, JitConfig, LocalCatalog, replay``.
Importing the package does no work and imports neither torch nor tiled: each
name is imported from its module on first use (PEP 562).
"""

from __future__ import annotations

import importlib

from ._version import __version__ as __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms)
if TYPE_CHECKING:
    from typing import Any

    from .apps.replay import replay
    from .callbacks import JitCallback
    from .catalog import LocalCatalog
    from .config import JitConfig
    from .worker_process import JitProcess


_HOMES = {
    "JitCallback": ".callbacks",
    "JitConfig": ".config",
    "LocalCatalog": ".catalog",
    "JitProcess": ".worker_process",
    "replay": ".apps.replay",
}
__all__ = ["JitCallback", "JitConfig", "JitProcess", "LocalCatalog", "replay"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]

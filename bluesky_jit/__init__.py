"""bluesky_jit: live just-in-time denoising of tomography scans, as a Bluesky plugin.

The package follows the data path::

    ingest -> projections -> geometry/reconstruction -> pairs -> models/training
    -> inference -> emit -> catalog

The face: ``from bluesky_jit import JitCallback, JitConfig, LocalCatalog, replay``.
Importing the package does no work and imports neither torch nor tiled: each
name is imported from its module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms)
if TYPE_CHECKING:
    from typing import Any

    from .callbacks import JitCallback
    from .catalog import LocalCatalog
    from .config import JitConfig
    from .replay import replay

__version__ = "0.1.0"

_HOMES = {
    "JitCallback": ".callbacks",
    "JitConfig": ".config",
    "LocalCatalog": ".catalog",
    "replay": ".replay",
}
__all__ = ["JitCallback", "JitConfig", "LocalCatalog", "replay"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


class _Face(types.ModuleType):
    """Keeps ``bluesky_jit.replay`` the function once the submodule of that name is imported.

    (Importing ``bluesky_jit.replay`` sets the package attribute to the module.)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _HOMES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face

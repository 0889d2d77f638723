"""bluesky_jit: live just-in-time denoising of tomography scans, as a Bluesky plugin.

The package follows the data path::

    ingest -> projections -> geometry/reconstruction -> pairs -> models/training
    -> inference -> emit -> catalog

Importing the package does no work and imports neither torch nor tiled.
"""

__version__ = "0.1.0"

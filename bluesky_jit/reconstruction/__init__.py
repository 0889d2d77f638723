"""Slice reconstruction from buffered, filtered projections.

A slice and a training patch are both just sets of points (x, y) in one
detector row's plane; :func:`slice_grid` and :func:`patch_grid` make them, and
a backend's ``backproject`` turns filtered projections into values there.
"""

from .grids import patch_grid, slice_grid
from .torch_backend import TorchBackprojector

__all__ = ["TorchBackprojector", "patch_grid", "slice_grid"]

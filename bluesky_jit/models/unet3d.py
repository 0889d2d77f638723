"""The Zx and Tx networks of Graas et al. 2023: the Standard U-Net with 3D convolutions.

Graas et al. 2023 (Table 1): "Zx-networks use x nearby spatial reconstructed slices,
and Tx-networks use x timeframes, with the middle frame as target. Both
increase the image input during training and inference, and use 3D
convolutions." Both are this one architecture; Z or T is the choice of the
stack (:class:`bluesky_jit.pairs.PairMaker` with ``stack="z"`` or ``"t"``).
Input (B, C, frames, H, W), output the middle frame (B, C_out, 1, H, W); see
:class:`bluesky_jit.models.unet.UNet`.
"""

from __future__ import annotations

from typing import Any

from .unet import UNet

DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "features": 8,  # as the Standard U-Net of Graas et al. 2023
    "levels": 3,
    "convs_per_level": 3,
    "residual": False,
    "frames": 3,  # T3, the network of Graas et al. 2023's online experiment (Results III)
}


def build(config: dict[str, Any]) -> UNet:
    """Build a 3D :class:`~bluesky_jit.models.unet.UNet` from a resolved config."""
    return UNet(spatial_dims=3, **config)

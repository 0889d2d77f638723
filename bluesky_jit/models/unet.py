"""The Standard U-Net of Graas et al. 2023.

Graas et al. 2023 ("Network architecture" under Software set-up): a U-Net that
"replicates the original U-Net proposal", with downscaling by strided
convolutions and upscaling by transposed convolutions, three down and
upscaling levels, three encoding and three decoding convolutional layers per
level with a concatenating skip connection, and 8 feature maps after the
first level, doubling per level. Its Cx variants set ``features=x``.

Layout with the defaults (F = ``features``; every conv is 3x3 and followed
by a ReLU, except the 1x1 output conv)::

    level  width  encoder                decoder
    0      F      conv, conv, conv       up(1->0) ++ skip, conv, conv, 1x1 conv
    1      2F     conv/2, conv, conv     up(2->1) ++ skip, conv, conv
    2      4F     conv/2, conv, conv     up(3->2) ++ skip, conv, conv
    3      8F     conv/2, conv, conv     (bottom)

(``conv/2``: stride 2; ``up``: 3x3 transposed conv, stride 2; ``++ skip``:
concatenate the encoder output of that level), so every level has n encoding
and n decoding layers, counting the strided and the transposed convolution.
The transposed convolution gets an explicit ``output_size`` and restores
exactly the size of the skip connection, so the network accepts any height
and width (20x20 training patches included, which are not multiples of 8).
:class:`bluesky_jit.inference.Denoiser` still reflect-pads full slices to a
multiple of ``size_multiple`` (2**levels), so that every down-scaling is
exact (no ragged last row or column) and cropping restores the input size.

Option, off by default: with ``residual=True`` the network predicts a
correction added to its input, ``A(u) = u + f(u)``, and the 1x1 output
convolution starts at zero, so an untrained network is the identity (accuracy
alpha = 1, Graas et al. 2023, eq. 3) rather than an arbitrary map. It is not the
default because the paper's plain U-Net trained faster on Noise2Noise pairs of
smooth blobs (20x20 patches, batch 32, Adam 1e-4, this module's defaults):
hold-out alpha 0.57 after 400 steps against 0.77 for the residual network.

3D variants (Graas et al. 2023, Table 1: Zx, x nearby slices; Tx, x time frames):
``spatial_dims=3`` builds the same network with 3x3x3 convolutions on inputs
of shape (B, C, frames, H, W) ("we treat a third dimension similar to the
first two"); down- and up-scaling act on H and W only (stride (1, 2, 2)),
because the stack is only 3 to 7 frames deep. The output is the middle frame,
shape (B, out_channels, 1, H, W), which is the Noise2Inverse target of a Z or
T stack. Registry name ``unet3d`` (:mod:`bluesky_jit.models.unet3d`).

References
----------
.. [1] A. Graas, S. B. Coban, K. J. Batenburg and F. Lucka, "Just-in-time deep
   learning for real-time X-ray computed tomography", Scientific Reports 13 (2023).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ScanDataError
from . import check_counts

DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    # Graas et al. 2023: "starting with 8 feature maps after the first level", "three down
    # and upscaling levels", "three encoding and three decoding convolutional layers"
    "features": 8,
    "levels": 3,
    "convs_per_level": 3,
    "residual": False,
}


def build(config: dict[str, Any]) -> UNet:
    """Build a :class:`UNet` from a resolved config (see ``DEFAULTS``)."""
    return UNet(**config)


class UNet(nn.Module):
    """Standard U-Net of Graas et al. 2023 (strided-conv down, transposed-conv up).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the input and output images.
    features : int
        Feature maps at the first level; level ``l`` has ``features * 2**l``.
    levels : int
        Number of down (and up) scaling steps.
    convs_per_level : int
        Encoding (and decoding) convolutions per level, at least 2.
    residual : bool
        Predict ``input + correction`` (identity at initialisation); needs
        ``in_channels == out_channels``.

    Notes
    -----
    Input shape (B, in_channels, H, W) gives output (B, out_channels, H, W)
    for any H, W >= 1. With the defaults the network has 183,201 parameters.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 8,
        levels: int = 3,
        convs_per_level: int = 3,
        residual: bool = False,
        spatial_dims: int = 2,
        frames: int = 1,
    ) -> None:
        super().__init__()
        counts = {"in_channels": in_channels, "out_channels": out_channels, "features": features}
        check_counts("UNet", DEFAULTS, levels=levels, **counts)
        check_counts("UNet", DEFAULTS, 2, convs_per_level=convs_per_level)
        check_counts("UNet", DEFAULTS, frames=frames)
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise ConfigError(f"UNet spatial_dims must be 2 or 3; got {spatial_dims!r}.")
        if spatial_dims == 2 and frames != 1:
            raise ConfigError(
                f"A 2D UNet takes one frame; got frames={frames}. Use the 'unet3d' model for "
                "Z or T stacks."
            )
        if spatial_dims == 3 and frames % 2 == 0:
            raise ConfigError(
                f"UNet frames must be odd (the middle frame is the output); got {frames}."
            )
        if residual and in_channels != out_channels:
            raise ConfigError(
                f"A residual UNet adds its input to its output, so in_channels ({in_channels}) "
                f"must equal out_channels ({out_channels}). Pass residual=False."
            )
        self.residual = bool(residual)
        self.levels = levels
        self.spatial_dims = spatial_dims
        """2 for images (B, C, H, W); 3 for stacks (B, C, frames, H, W)."""
        self.frames = frames
        """Input frames (the x of Zx / Tx); 1 for the 2D network."""
        self.size_multiple = 2**levels
        """Height and width that make every down-scaling exact (inference pads to it)."""

        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        up_conv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        down: int | tuple[int, int, int] = 2 if spatial_dims == 2 else (1, 2, 2)
        widths = [features * 2**level for level in range(levels + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for level, width in enumerate(widths):
            layers: list[nn.Module] = []
            for i in range(convs_per_level):
                stride = down if level > 0 and i == 0 else 1
                layers += [conv(channels, width, 3, stride=stride, padding=1), nn.ReLU()]
                channels = width
            self.encoders.append(nn.Sequential(*layers))

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(levels)):
            width = widths[level]
            self.ups.append(up_conv(widths[level + 1], width, 3, stride=down, padding=1))
            layers = []
            channels = 2 * width  # after concatenating the skip connection
            for _ in range(convs_per_level - 1):
                layers += [conv(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            self.decoders.append(nn.Sequential(*layers))

        self.head = conv(features, out_channels, 1)
        if self.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch.

        Parameters
        ----------
        x : Tensor, shape (B, in_channels, H, W) or (B, in_channels, frames, H, W)

        Returns
        -------
        Tensor, shape (B, out_channels, H, W) or (B, out_channels, 1, H, W)
            For stacks, the middle frame.
        """
        if x.ndim != self.spatial_dims + 2 or (
            self.spatial_dims == 3 and x.shape[2] != self.frames
        ):
            expected = "(B, C, H, W)" if self.spatial_dims == 2 else f"(B, C, {self.frames}, H, W)"
            raise ScanDataError(
                f"UNet got an input of shape {tuple(x.shape)}; expected {expected}."
            )
        skips = []
        h = x
        for encoder in self.encoders:
            h = encoder(h)
            skips.append(h)
        h = skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            skip = skips.pop()
            h = F.relu(up(h, output_size=skip.shape[2:]))
            h = decoder(torch.cat([h, skip], dim=1))
        if self.spatial_dims == 3:
            mid = self.frames // 2
            h, x = h[:, :, mid : mid + 1], x[:, :, mid : mid + 1]
        out = self.head(h)
        return x + out if self.residual else out

"""The tunable U-Net (TUNet) of DLSIA (Roberts et al. 2024, section 2.1).

Four hyperparameters shape the network (DLSIA): depth ``d`` ("d layers of
dual convolutions ... in each of the encoder and decoder phases, with d - 1
mirrored max-pooling, up-convolutions and concatenation steps"), base channels
``c_b`` ("the input data are mapped to this number of feature channels after
the initial convolution"), growth rate ``r`` (channels between successive
layers, so layer ``l`` has ``round(c_b * r**l)``) and hidden rate ``r_h``
(channels between the two convolutions inside a layer, ``round(c_l * r_h)``).
Rates may be non-integers. DLSIA puts batch normalisation and a ReLU after
every convolution (``batch_norm=True`` here, as there).

Layout (``c_l`` channels at layer ``l``, ``h_l = round(c_l * r_h)``)::

    encoder l: [conv3x3 -> h_l, BN, ReLU, conv3x3 -> c_l, BN, ReLU], then maxpool 2
    decoder l: up-conv 3x3 stride 2 (c_{l+1} -> c_l) ++ skip,
               [conv3x3 -> h_l, BN, ReLU, conv3x3 -> c_l, BN, ReLU]
    output:    conv1x1 c_0 -> out_channels

Max pooling rounds up and the up-convolution gets an explicit ``output_size``,
so any height and width work (20x20 patches included).

References
----------
.. [1] E. J. Roberts et al., "DLSIA: Deep Learning for Scientific Image
   Analysis", J. Appl. Cryst. 57 (2024).
.. [2] O. Ronneberger, P. Fischer, T. Brox, "U-Net", MICCAI (2015).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import check_batch, check_counts, check_reals

DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    # DLSIA quotes d = 4, c_b = 64, r = 2 (the original U-Net) as a starting point; that
    # network has millions of parameters and trains at well under 1 step/s on a 2-core CPU, so
    # the default here has the Standard U-Net's size: 4 layers (3 poolings), 8 base channels.
    "depth": 4,
    "base_channels": 8,
    "growth_rate": 2.0,
    "hidden_rate": 1.0,  # "typically set to 1" (DLSIA)
    "batch_norm": True,  # DLSIA's default
}


def build(config: dict[str, Any]) -> TunableUNet:
    """Build a :class:`TunableUNet` from a resolved config (see ``DEFAULTS``)."""
    return TunableUNet(**config)


def _double_conv(cin: int, hidden: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((cin, hidden), (hidden, cout)):
        layers.append(nn.Conv2d(a, b, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(b))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TunableUNet(nn.Module):
    """Tunable U-Net: depth, base channels, growth rate and hidden rate.

    Parameters
    ----------
    in_channels, out_channels : int
    depth : int
        Layers of dual convolutions on each side (``depth - 1`` poolings), >= 1.
    base_channels : int
        Channels of the first layer.
    growth_rate : float
        Channel factor between successive layers (> 0).
    hidden_rate : float
        Channel factor between the two convolutions of a layer (> 0).
    batch_norm : bool
        Batch normalisation after every 3x3 convolution.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 4,
        base_channels: int = 8,
        growth_rate: float = 2.0,
        hidden_rate: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        check_counts(
            "TunableUNet",
            DEFAULTS,
            in_channels=in_channels,
            out_channels=out_channels,
            depth=depth,
            base_channels=base_channels,
        )
        check_reals(
            "TunableUNet", DEFAULTS, -1, math.inf, growth_rate=growth_rate, hidden_rate=hidden_rate
        )
        self.in_channels = in_channels
        self.depth = depth
        self.size_multiple = 2 ** (depth - 1)
        self.frames = 1
        self.spatial_dims = 2
        channels = [max(1, round(base_channels * growth_rate**level)) for level in range(depth)]
        hidden = [max(1, round(c * hidden_rate)) for c in channels]
        self.channels = channels
        self.encoders = nn.ModuleList()
        cin = in_channels
        for c, h in zip(channels, hidden, strict=True):
            self.encoders.append(_double_conv(cin, h, c, batch_norm))
            cin = c
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            c, h = channels[level], hidden[level]
            self.ups.append(nn.ConvTranspose2d(channels[level + 1], c, 3, stride=2, padding=1))
            self.decoders.append(_double_conv(2 * c, h, c, batch_norm))
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch: (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        check_batch("TunableUNet", x, self.in_channels)
        skips = []
        h = x
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = encoder(h)
            skips.append(h)
        h = skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            skip = skips.pop()
            h = up(h, output_size=skip.shape[-2:])
            h = decoder(torch.cat([h, skip], dim=1))
        return self.head(h)

"""The mixed-scale dense network (MSD-Net) of Pelt and Sethian 2018.

Pelt and Sethian 2018: "Dilated convolutions instead of scaling; each layer is a single
image; all previous images (including input) are used", and "to compute the
output, [use] all intermediate images". Layer ``i`` (0-based) is a 3x3
convolution with dilation ``dilations[i % len(dilations)]`` of the input and
every earlier layer, plus a bias, followed by a ReLU; it adds ``width``
channels (1 in the paper). The output is a 1x1 convolution of the input and all
layers (a linear combination per pixel). The default dilations ``1 .. 10``
cycled over 100 layers are the paper's ``d = 100, l_m = 10`` ("each layer
d_i is assigned dilation i mod l_m", DLSIA (Roberts et al. 2024), section 2.3).

Every intermediate image has the input's size, so the network accepts any
height and width (no padding to a multiple at inference).

Just in time, on small patches: with 20x20 training patches most taps of a
dilation-10 convolution fall into the zero padding, so the network learns
patches, not slices. Measured here (``benchmarks/learning.py``, 60 s of
stream): dilations 1..10 gave 17.3 dB on the full slice, worse than TV (20.1),
at a normal hold-out alpha; dilations ``[1, 2, 3, 4]`` gave 21.4 dB. Keep the
largest dilation well below the patch size, or train on larger patches. The
paper's 100 layers train at about 7 steps/s on a 2-core CPU (30 layers: 30). Dense connections
make a naive implementation copy O(depth**2) images per pass; this one writes
each layer once into a preallocated buffer and computes the gradients itself
(:class:`_MSDFunction`), so memory and copies grow linearly with depth (the
approach of Hendriksen's ``msd_pytorch``).

References
----------
.. [1] D. M. Pelt and J. A. Sethian, "A mixed-scale dense convolutional neural
   network for image analysis", PNAS 115 (2018) 254-259.
.. [2] E. J. Roberts et al., "DLSIA: Deep Learning for Scientific Image
   Analysis", J. Appl. Cryst. 57 (2024), section 2.3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import check_batch, check_counts, check_dilations

DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "depth": 100,  # Pelt and Sethian 2018: 100 layers
    "width": 1,  # "each layer is a single image"
    "dilations": list(range(1, 11)),  # l_m = 10: dilation (i mod 10) + 1
}


def build(config: dict[str, Any]) -> MSDNet:
    """Build an :class:`MSDNet` from a resolved config (see ``DEFAULTS``)."""
    return MSDNet(**config)


class MSDNet(nn.Module):
    """Mixed-scale dense network (2D).

    Parameters
    ----------
    in_channels, out_channels : int
    depth : int
        Number of hidden layers.
    width : int
        Channels added per layer.
    dilations : list of int
        Dilation of layer ``i`` is ``dilations[i % len(dilations)]``.

    Notes
    -----
    Input (B, in_channels, H, W) gives (B, out_channels, H, W) for any H, W.
    Parameters: ``sum_i 9 * width * (in_channels + i * width) + width`` for the
    layers plus ``(in_channels + depth * width + 1) * out_channels`` for the
    output; 45,652 with the defaults (Pelt and Sethian 2018: "~46 thousand").
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 100,
        width: int = 1,
        dilations: list[int] | tuple[int, ...] = tuple(range(1, 11)),
    ) -> None:
        super().__init__()
        check_counts(
            "MSDNet",
            DEFAULTS,
            in_channels=in_channels,
            out_channels=out_channels,
            depth=depth,
            width=width,
        )
        check_dilations("MSDNet", dilations, " The default is [1, 2, ..., 10].")
        self.in_channels = in_channels
        self.width = width
        self.depth = depth
        self.dilations = [int(dilations[i % len(dilations)]) for i in range(depth)]
        self.size_multiple = 1
        """Any height and width works: no down-scaling."""
        self.frames = 1
        self.spatial_dims = 2
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(depth):
            fan_in = in_channels + i * width
            w = torch.empty(width, fan_in, 3, 3)
            # He initialisation for ReLU layers, as msdnet/msd_pytorch do
            nn.init.normal_(w, std=math.sqrt(2.0 / (9 * fan_in)))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(width)))
        self.head = nn.Conv2d(in_channels + depth * width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch: (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        check_batch("MSDNet", x, self.in_channels)
        features = _MSDFunction.apply(x, self.dilations, self.width, *self.weights, *self.biases)
        return self.head(features)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _taps_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(width, c, 3, 3) -> (c, 9 * width); column ``(3 * ky + kx) * width + o``."""
    width, c = weight.shape[:2]
    return weight.to(dtype).permute(1, 2, 3, 0).reshape(c, 9 * width)


def _shift_add(out: torch.Tensor, taps: torch.Tensor, dilation: int) -> None:
    """``out[y, x] += sum_k taps[y + dy_k, x + dx_k, k]`` with zeros outside.

    ``out`` is (B, H, W, w); ``taps`` is (B, H, W, 9, w); ``(dy_k, dx_k)`` is
    ``((k // 3 - 1) * dilation, (k % 3 - 1) * dilation)``: the 3x3 dilated
    cross-correlation of :func:`torch.nn.functional.conv2d` with zero padding.
    """
    height, width = out.shape[1:3]
    for k in range(9):
        dy = (k // 3 - 1) * dilation
        dx = (k % 3 - 1) * dilation
        y0, y1 = max(0, -dy), min(height, height - dy)
        x0, x1 = max(0, -dx), min(width, width - dx)
        if y0 >= y1 or x0 >= x1:
            continue
        out[:, y0:y1, x0:x1] += taps[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx, k]


def _dense_forward(
    x: torch.Tensor,
    dilations: list[int],
    width: int,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """All layers written into one (B, H, W, C_in + depth * width) buffer.

    Each 3x3 convolution from ``c`` channels to ``width`` is one matrix product
    (B*H*W, c) x (c, 9*width), giving the nine taps of every output channel,
    followed by nine shifted additions. A dense network's layers have few
    output channels and many inputs; as a matrix product this runs several
    times faster on a CPU than a dilated convolution with one output channel.
    """
    batch, cin, height, width_px = x.shape
    total = cin + len(weights) * width
    n = batch * height * width_px
    # Zeros, not empty: a strided bfloat16 matrix product on AMX (oneDNN) was seen to read
    # past the columns it was given, and NaN bit patterns in unset memory then gave NaN.
    buf = torch.zeros((batch, height, width_px, total), dtype=dtype, device=x.device)
    buf[..., :cin] = x.permute(0, 2, 3, 1)
    flat = buf.view(n, total)
    acc = torch.promote_types(dtype, torch.float32)
    channels = cin
    for w, b, d in zip(weights, biases, dilations, strict=True):
        taps = torch.mm(flat[:, :channels], _taps_matrix(w, dtype))
        taps = taps.view(batch, height, width_px, 9, width)
        z = b.to(acc).expand(batch, height, width_px, width).clone()
        _shift_add(z, taps, d)
        buf[..., channels : channels + width] = z.clamp_min_(0)
        channels += width
    return buf


class _MSDFunction(torch.autograd.Function):
    """Dense layers with a hand-written backward over one preallocated buffer."""

    @staticmethod
    def forward(ctx, x, dilations, width, *params):  # type: ignore[override]
        depth = len(dilations)
        weights, biases = list(params[:depth]), list(params[depth:])
        dtype = _compute_dtype(x)
        buf = _dense_forward(x, dilations, width, weights, biases, dtype)
        ctx.dilations, ctx.width, ctx.cin = dilations, width, x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(buf, *weights)
        features = buf.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        # under autocast the head casts to the compute dtype anyway
        return features if torch.is_autocast_enabled(x.device.type) else features.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_features):  # type: ignore[override]
        buf, *weights = ctx.saved_tensors
        dilations, width, cin = ctx.dilations, ctx.width, ctx.cin
        dtype = buf.dtype
        batch, height, width_px, total = buf.shape
        n = batch * height * width_px
        acc = torch.promote_types(dtype, torch.float32)
        # (B, H, W, C) gradient; accumulates every path into each layer
        grad = torch.empty(buf.shape, dtype=acc, device=buf.device)
        grad.copy_(grad_features.permute(0, 2, 3, 1))
        grad_flat = grad.view(n, total)
        flat = buf.view(n, total)
        grad_w: list[torch.Tensor | None] = [None] * len(weights)
        grad_b: list[torch.Tensor | None] = [None] * len(weights)
        need_x = ctx.needs_input_grad[0]
        for i in reversed(range(len(weights))):
            lo = cin + i * width
            g = grad[..., lo : lo + width] * (buf[..., lo : lo + width] > 0)
            g_taps = torch.zeros((batch, height, width_px, 9, width), dtype=acc, device=buf.device)
            _scatter_taps(g_taps, g, dilations[i])
            g_taps = g_taps.view(n, 9 * width).to(dtype)
            w = weights[i]
            gm = torch.mm(flat[:, :lo].t(), g_taps)  # (c, 9 * width)
            grad_w[i] = gm.view(lo, 3, 3, width).permute(3, 0, 1, 2).to(w.dtype).contiguous()
            grad_b[i] = g.sum(dim=(0, 1, 2)).to(w.dtype)
            if i > 0 or need_x:
                grad_flat[:, :lo] += torch.mm(g_taps, _taps_matrix(w, dtype).t()).to(acc)
        grad_x = grad[..., :cin].permute(0, 3, 1, 2).to(ctx.x_dtype) if need_x else None
        return (grad_x, None, None, *grad_w, *grad_b)


def _scatter_taps(g_taps: torch.Tensor, g: torch.Tensor, dilation: int) -> None:
    """``g_taps[y', x', k] = g[y' - dy_k, x' - dx_k]`` (zeros outside): the forward's adjoint."""
    height, width = g.shape[1:3]
    for k in range(9):
        dy = (k // 3 - 1) * dilation
        dx = (k % 3 - 1) * dilation
        # forward: out[y] += taps[y + dy]  =>  d taps[y'] = g[y' - dy] for y' - dy inside
        y0, y1 = max(0, dy), min(height, height + dy)
        x0, x1 = max(0, dx), min(width, width + dx)
        if y0 >= y1 or x0 >= x1:
            continue
        g_taps[:, y0:y1, x0:x1, k] = g[:, y0 - dy : y1 - dy, x0 - dx : x1 - dx]

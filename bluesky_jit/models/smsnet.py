"""The sparse mixed-scale network (SMSNet) of DLSIA (Roberts et al. 2024, section 2.4).

A random directed acyclic graph: an input node I, ``depth`` hidden nodes
L_1 .. L_depth of ``width`` channels each, and an output node O. DLSIA's
hyperparameters, with its names:

- ``depth`` (d): the number of hidden nodes;
- ``min_edges``, ``max_edges`` (k_min, k_max): the number ``n_j`` of edges
  leaving hidden node j toward later hidden nodes lies in
  ``[min(k_min, d - j), min(k_max, d - j)]``;
- ``degree_gamma`` (LL_gamma): ``P(n_j) ~ exp(-gamma * n_j)``;
- ``skip_alpha`` (LL_alpha): an edge j -> i is chosen with probability
  ``~ exp(-alpha * |i - j|)``;
- ``p_input_hidden``, ``p_hidden_output`` (P_IL, P_LO): probability of an edge
  I -> L_j and L_j -> O; ``input_output`` (P_IO): edges I -> O;
- ``dilations``: each edge between I or L nodes is a 3x3 convolution with a
  dilation drawn from this list ("specifying custom dilations of
  [2^0, 2^1, ..., 2^n] from which to sample").

DLSIA draws LL_gamma from U(0, 0.5) and LL_alpha from U(0.75, 1) per
network; here they are plain config values, by default the means of those
ranges. Edges into O are 1x1 convolutions (a per-pixel linear combination,
as the output layer of an MSD-Net). A hidden node is the ReLU of the sum of
its incoming edges plus a bias. Every hidden node gets at least one incoming
edge (from I if the draw gave none) and at least one path out (to O), so no
node is dead.

As for the MSD-Net, dilations must suit the training patches: with
DLSIA's ``[1, 2, 4, 8, 16]`` on 20x20 patches the network learned the zero
padding and gave 12.3 dB on full slices (TV: 20.1); ``[1, 2, 4]`` gave 21.6 dB
(``benchmarks/learning.py``, 60 s of stream).

The graph is drawn from ``graph_seed`` alone, never from the global RNG: the
same config always gives the same architecture, so a checkpoint (config +
weights) rebuilds it exactly. :attr:`SMSNet.edges` lists it.

References
----------
.. [1] E. J. Roberts et al., "DLSIA: Deep Learning for Scientific Image
   Analysis", J. Appl. Cryst. 57 (2024), section 2.4.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import check_batch, check_counts, check_dilations, check_reals

DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "depth": 20,  # DLSIA: d = 20
    "width": 4,
    "min_edges": 1,  # DLSIA: {k_min, k_max} = {1, 5}
    "max_edges": 5,
    "degree_gamma": 0.25,  # mean of DLSIA's U(0, 0.5)
    "skip_alpha": 0.875,  # mean of DLSIA's U(0.75, 1)
    "p_input_hidden": 1.0,  # DLSIA: {P_IL, P_LO, P_IO} = {1, 1, 1}
    "p_hidden_output": 1.0,
    "input_output": True,
    "dilations": [1, 2, 4, 8, 16],
    "graph_seed": 0,
}


def build(config: dict[str, Any]) -> SMSNet:
    """Build an :class:`SMSNet` from a resolved config (see ``DEFAULTS``)."""
    return SMSNet(**config)


class Edge(NamedTuple):
    """One connection of the graph: node ``source`` feeds node ``target``.

    Nodes are numbered 0 (input), 1..depth (hidden) and depth + 1 (output);
    ``dilation`` is 0 for the 1x1 edges into the output.
    """

    source: int
    target: int
    dilation: int


def random_graph(
    *,
    depth: int,
    min_edges: int,
    max_edges: int,
    degree_gamma: float,
    skip_alpha: float,
    p_input_hidden: float,
    p_hidden_output: float,
    input_output: bool,
    dilations: list[int],
    graph_seed: int,
) -> list[Edge]:
    """The edges of an SMSNet graph (see the module docstring), sorted by target."""
    rng = np.random.default_rng(graph_seed)
    out = depth + 1
    edges: set[Edge] = set()
    incoming = [0] * (depth + 2)
    outgoing = [0] * (depth + 2)

    def add(source: int, target: int, dilation: int) -> None:
        edges.add(Edge(source, target, dilation))
        incoming[target] += 1
        outgoing[source] += 1

    def dilation() -> int:
        return int(dilations[rng.integers(len(dilations))])

    for j in range(1, depth + 1):
        later = depth - j  # hidden nodes after j
        lo, hi = min(min_edges, later), min(max_edges, later)
        if hi > 0:
            counts = np.arange(lo, hi + 1)
            p = np.exp(-degree_gamma * counts)
            n_j = int(rng.choice(counts, p=p / p.sum()))
            targets = np.arange(j + 1, depth + 1)
            q = np.exp(-skip_alpha * (targets - j))
            for i in rng.choice(targets, size=n_j, replace=False, p=q / q.sum()):
                add(j, int(i), dilation())
    for j in range(1, depth + 1):
        if rng.random() < p_input_hidden:
            add(0, j, dilation())
        if rng.random() < p_hidden_output:
            add(j, out, 0)
    for j in range(1, depth + 1):  # no dead nodes
        if incoming[j] == 0:
            add(0, j, dilation())
        if outgoing[j] == 0:
            add(j, out, 0)
    if input_output or incoming[out] == 0:
        add(0, out, 0)
    return sorted(edges, key=lambda e: (e.target, e.dilation, e.source))


class SMSNet(nn.Module):
    """Random sparse mixed-scale network (2D); parameters as ``DEFAULTS``.

    Notes
    -----
    Input (B, in_channels, H, W) gives (B, out_channels, H, W) for any H, W.
    Edges into one node with one dilation share a single convolution over the
    concatenated sources, so a node costs one convolution per distinct dilation.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        depth: int = 20,
        width: int = 4,
        min_edges: int = 1,
        max_edges: int = 5,
        degree_gamma: float = 0.25,
        skip_alpha: float = 0.875,
        p_input_hidden: float = 1.0,
        p_hidden_output: float = 1.0,
        input_output: bool = True,
        dilations: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16),
        graph_seed: int = 0,
    ) -> None:
        super().__init__()
        counts = {"in_channels": in_channels, "out_channels": out_channels, "depth": depth}
        check_counts("SMSNet", DEFAULTS, width=width, **counts)
        check_counts("SMSNet", DEFAULTS, 0, min_edges=min_edges, max_edges=max_edges)
        check_counts("SMSNet", DEFAULTS, 0, graph_seed=graph_seed)
        if min_edges > max_edges:
            raise ConfigError(
                f"SMSNet min_edges ({min_edges}) must not exceed max_edges ({max_edges})."
            )
        check_reals(
            "SMSNet", DEFAULTS, 0, math.inf, degree_gamma=degree_gamma, skip_alpha=skip_alpha
        )
        check_reals(
            "SMSNet",
            DEFAULTS,
            0,
            1.0,
            p_input_hidden=p_input_hidden,
            p_hidden_output=p_hidden_output,
        )
        check_dilations("SMSNet", dilations)
        self.in_channels = in_channels
        self.width = width
        self.depth = depth
        self.size_multiple = 1
        self.frames = 1
        self.spatial_dims = 2
        self.edges = random_graph(
            depth=depth,
            min_edges=min_edges,
            max_edges=max_edges,
            degree_gamma=float(degree_gamma),
            skip_alpha=float(skip_alpha),
            p_input_hidden=float(p_input_hidden),
            p_hidden_output=float(p_hidden_output),
            input_output=bool(input_output),
            dilations=list(dilations),
            graph_seed=graph_seed,
        )
        """The graph, as :class:`Edge` values sorted by target node."""

        def channels(node: int) -> int:
            return in_channels if node == 0 else width

        # per hidden node: [(dilation, sources)], one convolution each
        self._plan: list[list[tuple[int, list[int]]]] = []
        self.convs = nn.ModuleList()
        for node in range(1, depth + 1):
            groups: dict[int, list[int]] = {}
            for e in self.edges:
                if e.target == node:
                    groups.setdefault(e.dilation, []).append(e.source)
            plan = sorted(groups.items())
            self._plan.append(plan)
            for i, (d, sources) in enumerate(plan):
                cin = sum(channels(s) for s in sources)
                # one bias per node: on its first convolution only
                self.convs.append(nn.Conv2d(cin, width, 3, padding=d, dilation=d, bias=i == 0))
        self._head_sources = sorted(e.source for e in self.edges if e.target == depth + 1)
        self.head = nn.Conv2d(sum(channels(s) for s in self._head_sources), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch: (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        check_batch("SMSNet", x, self.in_channels)
        nodes = [x]
        convs = iter(self.convs)
        for plan in self._plan:
            total = None
            for _, sources in plan:
                inputs = (
                    nodes[sources[0]]
                    if len(sources) == 1
                    else torch.cat([nodes[s] for s in sources], dim=1)
                )
                z = next(convs)(inputs)
                total = z if total is None else total + z
            nodes.append(F.relu(total))
        head_in = torch.cat([nodes[s] for s in self._head_sources], dim=1)
        return self.head(head_in)

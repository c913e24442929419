"""Devices, nodes and what it costs a token to move between two of them.

Glossary:
    G = devices (GPUs), N = nodes; devices ``g`` with ``g // (G // N) == n`` sit in node ``n``.
    transition cost: 0 on the same device, ``intra_node_cost`` between devices of one node,
    ``inter_node_cost`` between nodes (the interconnect hierarchy: NVLink inside, network across).

Example::

    topo = Topology(num_devices=8, num_nodes=2)
    topo.cost_matrix()[0, 5]   # 2.0: device 0 is in node 0, device 5 in node 1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    num_devices: int
    num_nodes: int = 1
    intra_node_cost: float = 1.0
    inter_node_cost: float = 2.0

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be at least 1, got {self.num_devices}")
        if self.num_nodes < 1 or self.num_devices % self.num_nodes:
            raise ValueError(
                f"num_nodes ({self.num_nodes}) must divide num_devices ({self.num_devices}): "
                "every node holds the same number of devices"
            )
        if not 0 < self.intra_node_cost <= self.inter_node_cost:
            raise ValueError(
                f"need 0 < intra_node_cost <= inter_node_cost, got {self.intra_node_cost}, {self.inter_node_cost}"
            )

    @property
    def devices_per_node(self) -> int:
        return self.num_devices // self.num_nodes

    @property
    def hierarchical(self) -> bool:
        """True when some pairs of devices cost more than others (several nodes of several devices)."""
        return 1 < self.num_nodes < self.num_devices and self.inter_node_cost != self.intra_node_cost

    @property
    def device_cost(self) -> float:
        """Cost of a transition between two devices when the topology is not hierarchical."""
        return self.inter_node_cost if self.num_nodes == self.num_devices and self.num_devices > 1 else self.intra_node_cost

    def node_of(self, device: np.ndarray | int) -> np.ndarray:
        return np.asarray(device) // self.devices_per_node

    def cost_matrix(self) -> np.ndarray:
        """[G, G] cost of one token transition from device g to device h."""
        node = self.node_of(np.arange(self.num_devices))
        same_node = node[:, None] == node[None, :]
        cost = np.where(same_node, self.intra_node_cost, self.inter_node_cost).astype(np.float64)
        np.fill_diagonal(cost, 0.0)
        return cost

"""Placement plans: the ``moe-placement/1`` JSON format, its loader, and evaluation on any trace.

A plan maps each (MoE layer, expert) to its primary device, and may add replicas of hot experts in spare
slots. A token prefers the copy on the device that holds most of its previous-layer experts (the copies
it used there); ties, and the first MoE layer, follow the expert's route table: ``route[g]`` is the
copy for a token coming from device g (the device of its highest-weight expert at the previous layer;
at the first MoE layer, the token's home device ``t % G``). A replicated expert's tokens are then split
across its copies by load (EPLB-style quotas, ``placement.balance``), keeping preferences within quotas.

Format (JSON)::

    {"format": "moe-placement/1", "num_devices": G, "num_nodes": N, "moe_layers": [1, 2, ...],
     "experts": [[device of expert e at layer l for e] for l],
     "replicas": {"<layer index>": {"<expert>": {"devices": [primary, replica, ...], "route": [G ints]}}},
     "objective": {...}, "trace": {...}}

Layer indices in ``experts`` and ``replicas`` count MoE layers from 0 (position in ``moe_layers``).

Metrics (``evaluate_plan``), over every token and every pair of consecutive MoE layers, all K x K slot pairs:
    cross_device_share: fraction of pairs whose two experts' chosen copies are on different devices;
    cross_node_share: ... on different nodes; cost_per_pair: mean transition cost under a Topology;
    load: per layer, max device load / mean device load (tokens x slots).

Example::

    plan = load_plan("plan.json")
    evaluate_plan(plan, expert_ids).cross_device_share
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from moe_engine.placement.affinity import validate_expert_ids
from moe_engine.placement.balance import assign_to_quotas, fill_quotas
from moe_engine.placement.search import round_robin
from moe_engine.placement.topology import Topology

FORMAT = "moe-placement/1"


@dataclass(frozen=True)
class Replica:
    """Copies of one expert: ``devices[0]`` is the primary; ``route[g]`` is the copy used from device g."""

    devices: tuple[int, ...]
    route: tuple[int, ...]


@dataclass(frozen=True)
class PlacementPlan:
    experts: np.ndarray  # [L, E] primary device of each expert
    num_devices: int
    num_nodes: int = 1
    moe_layers: tuple[int, ...] = ()
    replicas: dict[int, dict[int, Replica]] = field(default_factory=dict)  # layer index -> expert -> copies
    objective: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        experts = np.asarray(self.experts)
        if experts.ndim != 2 or not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(f"experts must be an [L, E] integer array, got shape {experts.shape}")
        Topology(self.num_devices, self.num_nodes)  # validates devices / nodes
        if experts.size and (experts.min() < 0 or experts.max() >= self.num_devices):
            raise ValueError(f"experts holds a device outside 0..{self.num_devices - 1}")
        if self.moe_layers and len(self.moe_layers) != experts.shape[0]:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries but experts has {experts.shape[0]} layers")
        for layer, reps in self.replicas.items():
            if not 0 <= layer < experts.shape[0]:
                raise ValueError(f"replicas name layer index {layer}, outside 0..{experts.shape[0] - 1}")
            for e, rep in reps.items():
                if not 0 <= e < experts.shape[1]:
                    raise ValueError(f"replicas name expert {e} of layer {layer}, outside 0..{experts.shape[1] - 1}")
                if not rep.devices or rep.devices[0] != experts[layer, e]:
                    raise ValueError(f"replica list of layer {layer} expert {e} must start with its primary device")
                if len(set(rep.devices)) != len(rep.devices) or not all(0 <= d < self.num_devices for d in rep.devices):
                    raise ValueError(f"replica devices of layer {layer} expert {e} must be distinct valid devices")
                if len(rep.route) != self.num_devices or not set(rep.route) <= set(rep.devices):
                    raise ValueError(f"route of layer {layer} expert {e} must give one of its copies for each of {self.num_devices} devices")

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.experts.shape[1])

    @property
    def topology(self) -> Topology:
        return Topology(self.num_devices, self.num_nodes)

    def route_table(self) -> np.ndarray:
        """[L, E, G]: device whose copy of expert e at layer l serves a token coming from device g."""
        table = np.repeat(np.asarray(self.experts, dtype=np.int64)[:, :, None], self.num_devices, axis=2)
        for layer, reps in self.replicas.items():
            for e, rep in reps.items():
                table[layer, e] = rep.route
        return table

    def copy_table(self) -> np.ndarray:
        """[L, E, C]: devices holding a copy of each expert (primary first), padded with -1."""
        width = max([1] + [len(rep.devices) for reps in self.replicas.values() for rep in reps.values()])
        table = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        table[:, :, 0] = self.experts
        for layer, reps in self.replicas.items():
            for e, rep in reps.items():
                table[layer, e, : len(rep.devices)] = rep.devices
        return table

    def slots_used(self) -> np.ndarray:
        """[L, G] experts (primaries + replicas) held by each device."""
        used = np.stack([np.bincount(row, minlength=self.num_devices) for row in np.asarray(self.experts)])
        for layer, reps in self.replicas.items():
            for rep in reps.values():
                for d in rep.devices[1:]:
                    used[layer, d] += 1
        return used

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "num_devices": int(self.num_devices),
            "num_nodes": int(self.num_nodes),
            "moe_layers": [int(x) for x in (self.moe_layers or range(self.num_layers))],
            "experts": np.asarray(self.experts).astype(int).tolist(),
            "replicas": {
                str(layer): {
                    str(e): {"devices": [int(d) for d in rep.devices], "route": [int(d) for d in rep.route]}
                    for e, rep in sorted(reps.items())
                }
                for layer, reps in sorted(self.replicas.items())
                if reps
            },
            "objective": self.objective,
            "trace": self.trace,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlacementPlan:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a {FORMAT} plan (format field is {got!r})")
        try:
            experts = np.asarray(data["experts"], dtype=np.int64)
            replicas = {
                int(layer): {
                    int(e): Replica(tuple(int(d) for d in rep["devices"]), tuple(int(d) for d in rep["route"]))
                    for e, rep in reps.items()
                }
                for layer, reps in (data.get("replicas") or {}).items()
            }
            return cls(
                experts=experts,
                num_devices=int(data["num_devices"]),
                num_nodes=int(data.get("num_nodes", 1)),
                moe_layers=tuple(int(x) for x in data.get("moe_layers", range(experts.shape[0]))),
                replicas=replicas,
                objective=dict(data.get("objective") or {}),
                trace=data.get("trace") or {},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed {FORMAT} plan: {exc!r}") from None


def save_plan(plan: PlacementPlan, path: str | os.PathLike) -> None:
    """Write the plan as JSON atomically."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path for the plan, e.g. {path / 'plan.json'}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(plan_json_text(plan))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plan_json_text(plan: PlacementPlan) -> str:
    """The plan as JSON text, one line per top-level field, per layer of ``experts`` and per replicated layer."""
    data = plan.to_json()
    lines = []
    for key, value in data.items():
        if key == "experts":
            rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in value)
            text = f"[\n  {rows}\n ]" if value else "[]"
        elif key == "replicas" and value:
            rows = ",\n  ".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            text = f"{{\n  {rows}\n }}"
        else:
            text = json.dumps(value, separators=(", ", ": "))
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_plan(path: str | os.PathLike) -> PlacementPlan:
    """Read a ``moe-placement/1`` file; ValueError naming the problem for a bad one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist; make one with `moe-engine plan`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON {FORMAT} plan ({exc})") from None
    try:
        return PlacementPlan.from_json(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class PlanMetrics:
    cross_device_share: float
    cross_node_share: float
    cost_per_pair: float  # mean transition cost (Topology costs) per consecutive-layer slot pair
    max_load_ratio: float  # max over layers of (max device load / mean device load)
    mean_load_ratio: float  # mean over layers of the same ratio
    load_ratio_per_layer: tuple[float, ...]
    num_tokens: int
    num_pairs: int

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def token_devices(plan: PlacementPlan, expert_ids: np.ndarray, first_token: int = 0) -> np.ndarray:
    """[T, L, K]: device of the copy each token's expert is served from (routes applied layer by layer).

    The one route rule (runtime, ``evaluate_plan`` and the projection all use it). Without replicas:
    the expert's device. With replicas, per layer: each (token, slot) prefers the copy holding most of
    its previous-layer experts (the route table breaks ties; at the first MoE layer the route from the
    token's home device ``t % G``); then a replicated expert's entries are split across its copies by
    load (EPLB-style, ``placement.balance``): quotas even out the devices' loads, and entries keep
    their preferred copy while its quota lasts. Deterministic: every rank computes the same split.
    The split is over the tokens of the call (a batch): every row given counts as load. Row t's home
    device is ``(first_token + t) % G`` (``first_token``: the global number of the first row).
    """
    validate_expert_ids(expert_ids, plan.num_experts)
    num_tokens, num_layers, _ = expert_ids.shape
    if num_layers != plan.num_layers:
        raise ValueError(f"trace has {num_layers} MoE layers but the plan has {plan.num_layers}")
    ids = expert_ids.astype(np.int64)
    if not plan.replicas:
        return np.asarray(plan.experts)[np.arange(num_layers)[None, :, None], ids]
    table = plan.route_table()  # [L, E, G]
    copies = plan.copy_table()  # [L, E, C], -1 padded
    out = np.empty(ids.shape, dtype=np.int64)
    source = (first_token + np.arange(num_tokens)) % plan.num_devices  # home device before the first MoE layer
    prev: np.ndarray | None = None
    for layer in range(num_layers):
        routed = table[layer, ids[:, layer], source[:, None]]  # [T, K] the route table's choice
        cand = copies[layer, ids[:, layer]]  # [T, K, C]
        # copies holding most of the token's previous-layer experts win; the route breaks ties
        score = 0.5 * (cand == routed[:, :, None])
        if prev is not None:
            score = score + (cand[:, :, :, None] == prev[:, None, None, :]).sum(axis=3)
        score[cand < 0] = -np.inf
        routed = np.take_along_axis(cand, np.argmax(score, axis=2)[:, :, None], axis=2)[:, :, 0]
        reps = plan.replicas.get(layer)
        if reps:
            routed = _split_by_load(routed, ids[:, layer], score, reps, plan.num_devices)
        out[:, layer] = routed
        prev = routed
        source = routed[:, 0]  # slot 0: the highest-weight expert
    return out


def _split_by_load(routed: np.ndarray, ids: np.ndarray, score: np.ndarray, reps: dict[int, Replica],
                   num_devices: int) -> np.ndarray:
    """One layer: re-serve replicated experts' entries by load quotas. routed/ids: [T, K]; score: [T, K, C]."""
    replicated = np.isin(ids, np.fromiter(reps, dtype=np.int64))
    base = np.bincount(routed[~replicated], minlength=num_devices)
    masks = {e: ids == e for e in reps}
    flat_score = score.reshape(-1, score.shape[2])
    prefer = {e: np.bincount(np.argmax(flat_score[masks[e].ravel(), : len(rep.devices)], axis=1),
                             minlength=len(rep.devices)) for e, rep in reps.items()}
    quotas = fill_quotas(base, {e: (np.asarray(rep.devices), int(masks[e].sum())) for e, rep in reps.items()},
                         prefer=prefer)
    out = routed.copy()
    for e, rep in reps.items():
        rows = np.nonzero(masks[e].ravel())[0]  # entries in token order
        if not len(rows):
            continue
        ncopies = len(rep.devices)
        choice = assign_to_quotas(flat_score[rows, :ncopies], quotas[e])
        out.ravel()[rows] = np.asarray(rep.devices)[choice]
    return out


def split_by_load(plan: PlacementPlan, expert_ids: np.ndarray, first_token: int = 0) -> np.ndarray:
    """[T, L, K] device serving each (token, layer, slot) of ``expert_ids [T, L, K]``, hot experts' tokens
    split across their replicas by load. The runtime's entry point; the same rule as ``token_devices``."""
    return token_devices(plan, expert_ids, first_token)


def evaluate_plan(plan: PlacementPlan, expert_ids: np.ndarray, topology: Topology | None = None) -> PlanMetrics:
    """Cross-device / cross-node shares and load balance of ``plan`` on ``expert_ids [T, L, K]``."""
    topology = topology or plan.topology
    dev = token_devices(plan, expert_ids)
    num_tokens, num_layers, top_k = dev.shape
    node = topology.node_of(dev)
    cost = topology.cost_matrix()
    cross_dev = cross_node = total_cost = 0.0
    for layer in range(num_layers - 1):
        a, b = dev[:, layer, :, None], dev[:, layer + 1, None, :]
        cross_dev += float((a != b).sum())
        cross_node += float((node[:, layer, :, None] != node[:, layer + 1, None, :]).sum())
        total_cost += float(cost[a, b].sum())
    num_pairs = num_tokens * max(num_layers - 1, 0) * top_k * top_k
    ratios = []
    for layer in range(num_layers):
        per_device = np.bincount(dev[:, layer].ravel(), minlength=plan.num_devices)
        mean = per_device.mean()
        ratios.append(float(per_device.max() / mean) if mean > 0 else 1.0)
    denom = max(num_pairs, 1)
    return PlanMetrics(
        cross_device_share=cross_dev / denom,
        cross_node_share=cross_node / denom,
        cost_per_pair=total_cost / denom,
        max_load_ratio=max(ratios) if ratios else 1.0,
        mean_load_ratio=float(np.mean(ratios)) if ratios else 1.0,
        load_ratio_per_layer=tuple(ratios),
        num_tokens=int(num_tokens),
        num_pairs=int(num_pairs),
    )


def round_robin_plan(num_layers: int, num_experts: int, num_devices: int, num_nodes: int = 1) -> PlacementPlan:
    """The baseline: expert e on device e % G at every layer."""
    experts = round_robin(num_layers, num_experts, num_devices)
    return PlacementPlan(experts=experts, num_devices=num_devices, num_nodes=num_nodes, objective={"method": "round-robin"})

"""Trace-driven projection of expert-parallel communication: wire bytes, messages, all-to-all calls and time.

For sizes this machine cannot run: replay a routing trace against a placement plan (or round-robin) and
count, per decode batch, what the all-to-alls of expert parallelism would move, then price it with a link
model. Pure numpy; the device serving each (token, layer, slot) comes from ``placement.plan.token_devices``
(the one route rule, replicas split by load), applied per batch as the runtime would.

Glossary:
    G devices in N nodes (``Topology``); a token's home device is its slot in the batch modulo G
        (data-parallel attention: batch slot b lives on device b % G).
    row: one token's hidden state, ``hidden_size x bytes_per_element`` bytes.
    standard EP (dispatch + combine): two all-to-alls per MoE layer; for each slot k whose copy is on a
        device other than the token's home, one row goes home -> copy (dispatch) and one back (combine).
    context-coherent (ExFlow): one all-to-all per MoE layer; before layer l a token's state moves from
        the devices of its layer-(l-1) copies to those of its layer-l copies, one row per cross-device
        (k, k') slot pair (each source holds a partial output that every next copy needs: the K x K
        pairs ``evaluate_plan`` counts); before the first MoE layer from its home device (one row per
        cross-device slot). Outputs of the last layer stay where they are.
    device rows: the rows again, counted once per (token, source device, destination device): what moves
        when a sender merges a token's rows for one destination (sums partial outputs, sends a state once).
        Reported beside rows (``device_bytes_per_token``); messages and time use rows.
    regrouping: rows of one call batched per (source, destination) device pair: one message per
        distinct pair instead of one per row. Bytes are unchanged; messages (and latency) drop.
    call time (alpha-beta model): ``call_overhead`` + max over devices of max(send, receive) time, a
        device's time being the sum over its messages of the link latency plus bytes / link bandwidth
        (intra-node link inside a node, inter-node link across nodes). Calls run one after another.

Example::

    link = LinkModel.preset("nvlink")
    rows = project_variants(expert_ids, plan, link, batch=16)
    rows[0].bytes_per_token, rows[0].seconds_per_token
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from moe_engine.placement.affinity import validate_expert_ids
from moe_engine.placement.plan import PlacementPlan, round_robin_plan, token_devices

MODES = ("standard", "coherent")

# Link presets: per-direction bandwidth of one device (bytes/s) and per-message latency (s).
# nvlink: H100 NVLink 4 (900 GB/s both directions) inside a node, 400 Gb/s NDR InfiniBand per GPU across.
# pcie:   PCIe 4.0 x16 (~25 GB/s usable) inside a node, 200 Gb/s HDR InfiniBand per GPU across.
# ib:     every transfer through a 400 Gb/s NDR NIC (GPUs without NVLink, or one GPU per node).
LINK_PRESETS: dict[str, dict[str, float]] = {
    "nvlink": {"intra_bandwidth": 450e9, "intra_latency": 2e-6, "inter_bandwidth": 50e9, "inter_latency": 5e-6},
    "pcie": {"intra_bandwidth": 25e9, "intra_latency": 5e-6, "inter_bandwidth": 25e9, "inter_latency": 5e-6},
    "ib": {"intra_bandwidth": 50e9, "intra_latency": 5e-6, "inter_bandwidth": 50e9, "inter_latency": 5e-6},
}


@dataclass(frozen=True)
class LinkModel:
    """Link figures (defaults: ``nvlink`` preset at DeepSeek-V2-Lite shape, hidden 2048 in bf16)."""

    intra_bandwidth: float = 450e9  # bytes/s one device sends (and receives) inside its node
    intra_latency: float = 2e-6  # s per message inside a node
    inter_bandwidth: float = 50e9  # bytes/s one device sends (and receives) to other nodes
    inter_latency: float = 5e-6  # s per message across nodes
    call_overhead: float = 10e-6  # s per all-to-all call (launch and synchronisation)
    hidden_size: int = 2048  # elements per token row
    bytes_per_element: int = 2  # bf16
    name: str = "nvlink"

    def __post_init__(self) -> None:
        for key in ("intra_bandwidth", "inter_bandwidth"):
            value = getattr(self, key)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive number of bytes/s, got {value}")
        for key in ("intra_latency", "inter_latency", "call_overhead"):
            value = getattr(self, key)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a non-negative number of seconds, got {value}")
        if self.hidden_size < 1 or self.bytes_per_element < 1:
            raise ValueError(f"hidden_size and bytes_per_element must be >= 1, got {self.hidden_size}, {self.bytes_per_element}")

    @property
    def row_bytes(self) -> int:
        return int(self.hidden_size) * int(self.bytes_per_element)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LinkModel:
        """A named link model (``LINK_PRESETS``), with any field overridden."""
        if name not in LINK_PRESETS:
            raise ValueError(f"unknown link {name!r}; choose one of {', '.join(LINK_PRESETS)}")
        return cls(**{**LINK_PRESETS[name], "name": name, **overrides})


@dataclass(frozen=True)
class Projection:
    """Projected communication of one variant over a trace; ``*_per_token`` are totals / tokens."""

    placement: str  # "plan" | "round-robin"
    mode: str  # "standard" | "coherent"
    regroup: bool
    batch: int
    num_tokens: int
    num_batches: int
    calls_per_layer: int  # all-to-alls per MoE layer per batch
    calls: int  # all-to-all calls in total (batches x layers x calls_per_layer)
    rows: int  # token rows that cross devices
    device_rows: int  # the same, one per (token, source device, destination device): rows a sender merges
    inter_node_rows: int
    messages: int
    bytes_per_token: float
    device_bytes_per_token: float  # device_rows x row bytes / tokens: the floor if senders merge a token's rows
    inter_node_bytes_per_token: float
    messages_per_token: float
    seconds_per_token: float  # communication time / tokens
    cross_device_pairs: int  # coherent: cross-device (k, k') pairs between consecutive layers; standard: dispatch rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decode_batches(num_tokens: int, batch: int, sequence_starts: np.ndarray | None = None) -> list[np.ndarray]:
    """Token rows of each decode batch of ``batch`` tokens. With ``sequence_starts [S + 1]`` tokens are
    interleaved across sequences (step 0 of every sequence, then step 1, ...), as concurrent decoding."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1 token, got {batch}")
    order = np.arange(num_tokens)
    if sequence_starts is not None:
        starts = np.asarray(sequence_starts, dtype=np.int64)
        if starts.ndim != 1 or len(starts) < 2 or starts[0] != 0 or starts[-1] != num_tokens or np.any(np.diff(starts) < 0):
            raise ValueError(f"sequence_starts must rise from 0 to {num_tokens} tokens")
        seq = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        step = order - starts[seq]
        order = np.lexsort((seq, step))
    return [order[i: i + batch] for i in range(0, num_tokens, batch)]


def _layer_moves(dev: np.ndarray, home: np.ndarray, mode: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per all-to-all call of one batch: (source device, destination device, token) of every row. dev: [B, L, K]."""
    num_tokens, num_layers, top_k = dev.shape
    calls = []
    home_k = np.repeat(home[:, None], top_k, axis=1).ravel()
    tok_k = np.repeat(np.arange(num_tokens), top_k)
    tok_kk = np.repeat(np.arange(num_tokens), top_k * top_k)
    for layer in range(num_layers):
        if mode == "standard":
            dst = dev[:, layer].ravel()
            calls.append((home_k, dst, tok_k))  # dispatch
            calls.append((dst, home_k, tok_k))  # combine
        elif layer == 0:
            calls.append((home_k, dev[:, 0].ravel(), tok_k))
        else:
            src = np.repeat(dev[:, layer - 1, :, None], top_k, axis=2).ravel()
            dst = np.repeat(dev[:, layer, None, :], top_k, axis=1).ravel()
            calls.append((src, dst, tok_kk))
    return calls


def project(
    expert_ids: np.ndarray,
    plan: PlacementPlan,
    link: LinkModel | None = None,
    mode: str = "standard",
    regroup: bool = False,
    batch: int = 16,
    sequence_starts: np.ndarray | None = None,
    placement: str = "plan",
) -> Projection:
    """Project one variant of expert parallelism over ``expert_ids [T, L, K]`` under ``plan``."""
    link = link or LinkModel()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    validate_expert_ids(expert_ids, plan.num_experts)
    num_tokens, num_layers, _ = expert_ids.shape
    if num_layers != plan.num_layers:
        raise ValueError(f"trace has {num_layers} MoE layers but the plan has {plan.num_layers}; "
                         "project with a plan made for this model (moe-engine plan --trace ...)")
    batches = decode_batches(num_tokens, batch, sequence_starts)
    num_devices = plan.num_devices
    node = plan.topology.node_of(np.arange(num_devices))
    same_node = node[:, None] == node[None, :]
    latency = np.where(same_node, link.intra_latency, link.inter_latency)
    seconds_per_row = link.row_bytes / np.where(same_node, link.intra_bandwidth, link.inter_bandwidth)
    np.fill_diagonal(latency, 0.0)
    np.fill_diagonal(seconds_per_row, 0.0)
    # without replicas the route is per token, so one pass over the whole trace gives the same devices
    whole = None if plan.replicas else token_devices(plan, expert_ids)
    rows = device_rows = inter_rows = messages = pairs = 0
    seconds = 0.0
    calls_per_layer = 2 if mode == "standard" else 1
    for rows_of_batch in batches:
        if whole is None:
            dev = token_devices(plan, expert_ids[rows_of_batch])
        else:
            dev = whole[rows_of_batch]
        home = np.arange(len(rows_of_batch)) % num_devices
        for call, (src, dst, tok) in enumerate(_layer_moves(dev, home, mode)):
            counts = np.bincount(src * num_devices + dst, minlength=num_devices * num_devices)
            counts = counts.reshape(num_devices, num_devices)
            np.fill_diagonal(counts, 0)
            msgs = (counts > 0).astype(np.int64) if regroup else counts
            rows += int(counts.sum())
            cross = src != dst
            device_rows += len(np.unique((tok[cross] * num_devices + src[cross]) * num_devices + dst[cross]))
            inter_rows += int(counts[~same_node].sum())
            messages += int(msgs.sum())
            if mode == "coherent" and call > 0 or mode == "standard" and call % 2 == 0:
                pairs += int(counts.sum())
            busy = msgs * latency + counts * seconds_per_row  # [src, dst] seconds
            seconds += link.call_overhead + float(max(busy.sum(axis=1).max(), busy.sum(axis=0).max()))
    tokens = max(num_tokens, 1)
    return Projection(
        placement=placement, mode=mode, regroup=regroup, batch=batch, num_tokens=num_tokens,
        num_batches=len(batches), calls_per_layer=calls_per_layer, calls=len(batches) * num_layers * calls_per_layer,
        rows=rows, device_rows=device_rows, inter_node_rows=inter_rows, messages=messages,
        bytes_per_token=rows * link.row_bytes / tokens, device_bytes_per_token=device_rows * link.row_bytes / tokens,
        inter_node_bytes_per_token=inter_rows * link.row_bytes / tokens,
        messages_per_token=messages / tokens, seconds_per_token=seconds / tokens, cross_device_pairs=pairs,
    )


def project_variants(
    expert_ids: np.ndarray,
    plan: PlacementPlan | None,
    link: LinkModel | None = None,
    batch: int = 16,
    sequence_starts: np.ndarray | None = None,
    num_devices: int | None = None,
    num_nodes: int = 1,
    num_experts: int | None = None,
) -> list[Projection]:
    """Every variant: {round-robin, plan} x {standard, coherent} x {no regrouping, regrouping}.

    Without a plan only round-robin on ``num_devices`` devices in ``num_nodes`` nodes (the plan's otherwise),
    over ``num_experts`` experts per layer (default: the highest id in the trace + 1).
    """
    validate_expert_ids(expert_ids)
    num_layers = expert_ids.shape[1]
    if plan is not None:
        if num_devices is not None and num_devices != plan.num_devices:
            raise ValueError(f"the plan is for {plan.num_devices} devices, not {num_devices}; "
                             "drop --devices or make a plan for that many devices")
        if num_layers != plan.num_layers:
            raise ValueError(f"trace has {num_layers} MoE layers but the plan has {plan.num_layers}; "
                             "project with a plan made for this model (moe-engine plan --trace ...)")
        num_devices, num_nodes, num_experts = plan.num_devices, plan.num_nodes, plan.num_experts
    else:
        if num_devices is None:
            raise ValueError("give a plan or a number of devices")
        num_experts = validate_expert_ids(expert_ids, num_experts)
    baseline = round_robin_plan(num_layers, num_experts, num_devices, num_nodes)
    placements = [("round-robin", baseline)] + ([("plan", plan)] if plan is not None else [])
    return [
        project(expert_ids, p, link, mode=mode, regroup=regroup, batch=batch, sequence_starts=sequence_starts,
                placement=name)
        for name, p in placements for mode in MODES for regroup in (False, True)
    ]

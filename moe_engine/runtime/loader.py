"""``from_pretrained``: build a transformers MoE model whose routed experts live in the engine.

Steps: check the transformers-style arguments (dtype/torch_dtype, device_map, trust_remote_code);
resolve the path (a local directory, or a Hub ID "org/name" fetched or found in the Hub cache);
validate it and the config; pick the architecture adapter by ``config.model_type``; index
the safetensors files (headers only; truncated/corrupt files fail here); build the model with
parameters on the meta device (``accelerate.init_empty_weights``); replace every MoE block's experts
module with ``OffloadedExperts`` on this instance; load the non-expert tensors one by one, renamed
with transformers' own checkpoint conversion rules; locate each routed expert's bytes on disk; create
the slots under the budget, the mover and (optionally) the predictor.

The full expert set is never materialised: experts are only ever read into slots (or, on CUDA with
``host_tier`` pinned, into one pinned host arena sized to the experts, the slow tier).

Example::

    model = from_pretrained("path/to/mixtral", budget="4GiB", policy="lru", device="cpu")
    model.generate(input_ids, max_new_tokens=32)
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_engine.runtime.adapters import Adapter, get_adapter, moe_blocks, parse_expert_key
from moe_engine.runtime.cache import ExpertCache, PackedLayout
from moe_engine.runtime.config import EngineConfig, format_bytes, parse_budget, resolve_budget
from moe_engine.runtime.cuda_mover import CudaMover
from moe_engine.runtime.engine import Engine, MoELayerInfo, OffloadedExperts
from moe_engine.runtime.export import (
    OffloadedStateDict,
    check_dtype_device,
    check_to_arguments,
    expert_parameter_count,
    save_checkpoint,
)
from moe_engine.runtime.guardrail import Guardrail
from moe_engine.runtime.host_tier import plan_host_tier
from moe_engine.runtime.kernels import QuantizedKernel
from moe_engine.runtime.mover import Mover, ThreadMover
from moe_engine.runtime.policies import make_policy, working_set_warning
from moe_engine.runtime.quality import ExpertSizing, check_quality
from moe_engine.runtime.residency import Residency
from moe_engine.runtime.store import (
    CheckpointError,
    CheckpointStore,
    ExpertLocation,
    expert_location,
    fp8_block_size,
)
from moe_engine.runtime.threads import set_threads

logger = logging.getLogger(__name__)


class BudgetWarning(UserWarning):
    """The budget holds fewer experts than one token needs across all MoE layers: hit rates will be low."""

_AUTO = "auto"


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == _AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What moe-engine reads from a Hub repository: config, weights, index, tokenizer, generation config.
_HUB_PATTERNS = [
    "config.json", "*.safetensors", "*.safetensors.index.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
    "chat_template*",
]  # fmt: skip
_TRUTHY = {"1", "on", "yes", "true"}


class BudgetClampedWarning(UserWarning):
    """The budget asked for more bytes than all experts take; the engine uses what all experts take."""


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in _TRUTHY for v in env) or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> Path | None:
    """The Hub cache named by HF_HUB_CACHE or HF_HOME now (None: huggingface_hub's own default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def _resolve_path(path: str | os.PathLike, revision: str | None) -> Path:
    """A local directory as given; a string that is not one but reads "org/name" is a Hugging Face Hub
    ID, fetched (config, safetensors, index, tokenizer and generation config only) or, offline
    (HF_HUB_OFFLINE=1), taken from the local Hub cache. Anything else is returned for ``_load_config``
    to report."""
    local = Path(path).expanduser()
    if local.exists() or not isinstance(path, str) or _HUB_ID.fullmatch(path) is None:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = _hub_offline()
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            path, revision=revision, cache_dir=_hub_cache_dir(), allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
        )  # fmt: skip
    except LocalEntryNotFoundError as e:
        how = (
            f"HF_HUB_OFFLINE=1 is set, so nothing is downloaded: download it first with "
            f"`hf download {path}` (or huggingface_hub.snapshot_download({path!r})) while online, "
            "then run offline again"
            if offline
            else f"it could not be downloaded either (no connection?): run `hf download {path}` where the "
            "Hub is reachable, or pass a local checkpoint directory"
        )
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and the Hugging Face Hub model {path}{at} is not in the "
            f"local cache ({_hub_cache_dir() or 'the default Hugging Face cache'}); {how}"
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and the Hugging Face Hub could not provide model {path}{at}: "
            f"{e}. Check the ID, the revision and your access (hf auth login), or pass a local directory"
        ) from e
    return Path(folder)


def _check_transformers_args(device_map: Any, trust_remote_code: bool | None) -> None:
    """Refuse the transformers arguments moe-engine cannot honour, saying what to use instead."""
    if device_map is not None and device_map != _AUTO:
        raise ValueError(
            f"device_map={device_map!r} is not supported: moe-engine places experts itself (non-expert "
            "weights on the compute device, experts in slots under the budget); pass device='cpu' or "
            "device='cuda' instead, and leave device_map unset or 'auto'"
        )
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is not supported: moe-engine runs only MoE architectures built into "
            "transformers (see moe_engine.runtime.adapters), never a checkpoint's own Python code; "
            "drop trust_remote_code"
        )


def _resolve_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` or its old transformers name ``torch_dtype`` as a torch.dtype; None or "auto": the
    checkpoint's own (decided later from its config)."""
    if dtype is not None and torch_dtype is not None and _as_dtype(dtype) != _as_dtype(torch_dtype):
        raise ValueError(
            f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is the old name of "
            "dtype: pass only dtype"
        )
    return _as_dtype(dtype if dtype is not None else torch_dtype)


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or value == _AUTO:
        return None
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"dtype {value!r} is not a torch dtype; use e.g. torch.bfloat16, 'bfloat16' or 'auto'")


def _load_config(path: Path):
    return _load_config_and_quantization(path)[0]


def _load_config_and_quantization(path: Path) -> tuple[Any, Any]:
    """(the model config without its quantization_config, the moe-engine QuantizationConfig or None)."""
    from transformers import AutoConfig

    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist; moe-engine loads a local checkpoint directory "
            "(config.json + *.safetensors), e.g. one written by save_pretrained"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}; point --model at a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    return config, _drop_quantization_config(config)


def _drop_quantization_config(config) -> Any:
    """Validate ``config.quantization_config`` (ValueError naming any method moe-engine cannot run), then
    remove it from the config the model is built from: the store dequantizes FP8 block-scaled weights
    itself (``moe_engine.runtime.store``), so transformers must not put its own FP8 layers in the model.
    Returns the ``moe_engine.quant.checkpoint.QuantizationConfig`` of a checkpoint written by
    ``moe-engine quantize`` (its experts are computed in their formats), else None."""
    qc = getattr(config, "quantization_config", None)
    ours = None
    raw = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if isinstance(raw, dict) and raw.get("quant_method") == "moe-engine":
        from moe_engine.quant.checkpoint import QuantizationConfig

        ours = QuantizationConfig.from_json(raw, where="config.json quantization_config")
    else:
        fp8_block_size(qc)
    if qc is not None:
        del config.quantization_config
    return ours


def _expert_locations(
    store: CheckpointStore, adapter: Adapter, moe_of_decoder: dict[int, int], num_experts: int, inter: int, hidden: int,
    num_decoder_layers: int | None = None,
) -> dict[tuple[int, int], ExpertLocation]:
    parts: dict[tuple[int, int], dict[str, Any]] = {}
    for name, loc in store.tensors.items():
        parsed = parse_expert_key(name, adapter)
        if parsed is None:
            continue
        dec, expert, part = parsed
        if num_decoder_layers is not None and dec >= num_decoder_layers:
            # Layers past the model's own, e.g. DeepSeek-V3's multi-token-prediction layer 61, which
            # transformers does not build either.
            logger.info("ignoring checkpoint tensor %s (decoder layer %d is not part of the model)", name, dec)
            continue
        if dec not in moe_of_decoder:
            raise CheckpointError(
                f"checkpoint tensor {name} is a routed expert of decoder layer {dec}, which the config "
                "does not make a MoE layer: the checkpoint does not match its config.json"
            )
        moe = moe_of_decoder[dec]
        if expert is None:  # fused tensor [E, ...]: one row per expert
            if loc.shape[0] != num_experts:
                raise CheckpointError(f"fused expert tensor {name} has {loc.shape[0]} experts, config says {num_experts}")
            for e in range(num_experts):
                parts.setdefault((moe, e), {})[part] = (name, e)
        else:
            parts.setdefault((moe, expert), {})[part] = name
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "gate_up": (2 * inter, hidden)}
    out = {}
    for moe in moe_of_decoder.values():
        for e in range(num_experts):
            if (moe, e) not in parts:
                raise CheckpointError(
                    f"checkpoint {store.root} has no weights for expert {e} of MoE layer {moe}; it is incomplete"
                )
            out[(moe, e)] = expert_location(store, parts[(moe, e)], shapes)
    return out


# A routed expert's part in a checkpoint written by ``moe-engine quantize`` (moe_engine.quant.checkpoint).
_QUANT_EXPERT_KEY = re.compile(r"^.*layers\.\d+\.mlp\.experts\.\d+\.(copies\.[\w.-]+\.)?(gate_up_proj|down_proj)\.\w+$")


def _load_dense_weights(
    model, store: CheckpointStore, adapter: Adapter, device: torch.device, progress: bool = False
) -> None:
    """Load every non-expert tensor into the meta-built model, renamed as transformers would."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    expected = model.state_dict()
    loaded: set[str] = set()
    names = [n for n in store.tensors if parse_expert_key(n, adapter) is None and not _QUANT_EXPERT_KEY.match(n)]
    for name in tqdm(names, desc="loading non-expert weights", unit="tensor", disable=not progress):
        target, _ = rename_source_key(name, renamings, [], model.base_model_prefix, expected)
        if target not in expected:
            logger.info("ignoring checkpoint tensor %s (no such parameter in the model)", name)
            continue
        value = store.read_tensor(name, dtype=expected[target].dtype)  # FP8 block-scaled: dequantized
        if tuple(value.shape) != tuple(expected[target].shape):
            raise CheckpointError(
                f"checkpoint tensor {name} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(expected[target].shape)}: the checkpoint does not match its config.json"
            )
        set_module_tensor_to_device(model, target, device, value=value)
        loaded.add(target)
    model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint {store.root} lacks {len(missing)} tensor(s) the model needs ({shown}); "
            "it is incomplete or does not match its config.json"
        )


def from_pretrained(
    path: str | os.PathLike,
    budget: int | float | str = 0.25,
    policy: str = "auto",
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    experts_implementation: str | None = None,
    predictor: Any = _AUTO,
    prefetch_distance: int = 1,
    prefetch_per_layer: int = 6,
    prefetch_min_prob: float = 0.25,
    page_cache: bool = False,
    io_threads: int = 2,
    host_tier: str = "auto",
    prefill_policy: str = "stream",
    prefill_window: float = 0.25,
    preload: bool = True,
    quality: str = "lossless",
    guardrail: float | None = None,
    guardrail_every: int = 16,
    progress: bool = False,
    threads: int | None = None,
    torch_dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    plan: Any = None,
    ep_mode: str = "standard",
    **unknown: Any,
):
    """Load a Hugging Face MoE checkpoint with its routed experts offloaded under ``budget``.

    Args:
        path: local checkpoint directory (config.json + safetensors, sharded or not), or a Hugging Face
            Hub ID ("org/name") that is not a local directory: fetched with ``huggingface_hub`` (config,
            safetensors, index, tokenizer and generation config only), from the local cache when
            HF_HUB_OFFLINE=1.
        budget: fast-tier bytes for experts (``moe_engine.runtime.config.parse_budget``): int bytes, a
            string ("2GiB", "512MB", "25%") or a fraction (0.25, "0.25", 1.0, "1.0") of all expert bytes.
            Must hold at least one expert; more than all experts take is clamped, with a warning.
        policy: eviction policy (``moe_engine.runtime.policies.available_policies()``) or "none" (no cache).
        device: "cuda" (default when available) or "cpu".
        dtype: compute dtype (default: the checkpoint's ``config.dtype``, else float32).
        experts_implementation: transformers' experts implementation to reproduce bit for bit
            (``moe_engine.runtime.kernels.available_kernels()``: "grouped_mm", transformers' default, or
            "eager"); default: what transformers would use for this model.
        predictor: "cross_layer_gate" (default, unless policy="none"), another registered predictor
            name, a ``predictors.Predictor`` instance, or None to disable prefetch.
        prefetch_distance: MoE layers ahead to prefetch.
        prefetch_per_layer, prefetch_min_prob: at most this many prefetches per predicted layer and step,
            each with a predicted probability of at least this (``moe_engine.runtime.residency.PrefetchRule``).
        page_cache: let the OS page cache keep expert pages (off: the budget is the real bound).
        prefill_policy, prefill_window: how a prefill (a forward pass with more than one new position
            per sequence) uses the cache: "stream" (default) reads the next layer's experts ahead and
            displaces at most ``prefill_window`` (a fraction) of the slots, its own loads leaving first
            afterwards, so the decode working set survives; "shared": as a decode step
            (``moe_engine.runtime.engine``).
        preload: fill the budget with experts while loading (each MoE layer an equal share; what stock
            offloading does too), so the first request does not start from an empty cache; costs
            budget / read rate of load time. Off: the cache starts empty. With expert parallelism each
            rank reads only the experts its plan places on it.
        threads: torch intra-op threads (a process-wide setting); default: half the physical cores
            (``moe_engine.runtime.threads``: torch's default of one per core slows a shared machine badly).
        quality: which stored copy of an expert a load brings (``moe_engine.runtime.quality``):
            "lossless" (default: the expert's own format), "balanced" (a demand miss loads the smallest
            copy, a prefetch the own format), "fast" (always the smallest copy). Other than "lossless"
            needs a checkpoint with lower-precision copies (``moe-engine quantize``).
        guardrail, guardrail_every: a KL bound (nats) on the next-token distribution, checked every
            ``guardrail_every`` decode steps against a pass with full-precision experts; above it the
            worst layers go back to full precision (``moe_engine.runtime.guardrail``). None: no checks.
        host_tier: on CUDA, where the experts that do not fit the budget wait: "auto" (nothing pinned
            when every expert fits the budget, else one pinned host arena when it fits in RAM with a
            safety margin, else the files with a warning), "pinned" (pin even inside the margin) or
            "disk" (stream from the files through small pinned staging buffers). See
            ``moe_engine.runtime.host_tier``.
        torch_dtype: transformers' old name of ``dtype`` (giving both, different, is a ValueError).
        revision: Hub branch, tag or commit for a Hub ID (default: "main"); ignored for local directories.
        device_map: "auto" or None only (the engine places experts itself; choose the compute device
            with ``device``).
        trust_remote_code: False only; checkpoints with their own modelling code are refused.
        plan, ep_mode: expert parallelism (``moe_engine.distributed``): when ``plan`` is given (a
            ``moe-placement/1`` path or ``PlacementPlan``) or a torch.distributed process group with more
            than one rank is initialised, this rank serves only its experts (round-robin without a plan)
            and exchanges tokens with the others; ``ep_mode`` "standard" (two all-to-alls per MoE layer)
            or "coherent" (one).

    Other keyword arguments raise TypeError listing the accepted ones.

    Returns:
        the transformers ``PreTrainedModel`` (forward and ``generate`` work), with ``model.engine``.
        It is also a context manager (``with from_pretrained(...) as model:``) and has ``close()``;
        dropping the last reference to it frees its slots, threads and files as well.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    if unknown:
        accepted = [n for n in inspect.signature(from_pretrained).parameters if n != "unknown"]
        raise TypeError(
            f"from_pretrained() got unexpected keyword argument(s) {', '.join(sorted(unknown))}; "
            f"it accepts: {', '.join(accepted)}"
        )
    _check_transformers_args(device_map, trust_remote_code)
    check_quality(quality)
    if guardrail is not None and quality == "lossless":
        raise ValueError("guardrail= checks lower-precision copies: use it with quality='balanced' or 'fast'")
    guard = Guardrail(guardrail, guardrail_every) if guardrail is not None else None  # validates both
    ep_plan = plan  # (the name `plan` is reused below for the CUDA host-tier plan)
    dtype = _resolve_dtype(dtype, torch_dtype)
    set_threads(threads)  # torch's intra-op threads (process-wide); default: half the physical cores
    if experts_implementation is not None:
        from moe_engine.runtime.kernels import available_kernels

        if experts_implementation not in available_kernels():
            raise ValueError(
                f"experts_implementation {experts_implementation!r} is not one moe-engine reproduces; "
                f"choose one of: {', '.join(available_kernels())}"
            )
    if predictor == _AUTO:
        predictor = None if policy == "none" else "cross_layer_gate"
    cfg = EngineConfig(
        budget=parse_budget(budget),
        policy=policy,
        predictor=predictor if (predictor is None or isinstance(predictor, str)) else type(predictor).__name__,
        prefetch_distance=prefetch_distance,
        prefetch_per_layer=prefetch_per_layer,
        prefetch_min_prob=prefetch_min_prob,
        page_cache=page_cache,
        io_threads=io_threads,
        host_tier=host_tier,
        prefill_policy=prefill_policy,
        prefill_window=prefill_window,
        preload=preload,
    )
    if policy != "none":
        make_policy(policy, num_layers=1, num_experts=1, capacity=1)  # unknown names fail before any work
    dev = _resolve_device(device)
    path = _resolve_path(path, revision)
    config, qconfig = _load_config_and_quantization(path)
    adapter = get_adapter(config)
    store = CheckpointStore.open(path, page_cache=page_cache)
    try:
        if dtype is None:
            dtype = _as_dtype(getattr(config, "dtype", None)) or torch.float32
        assert isinstance(dtype, torch.dtype)
        with init_empty_weights(include_buffers=False):
            extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)

        # Replace each routed-experts module on this instance (no class is patched).
        blocks = moe_blocks(model)
        if not blocks:
            raise ValueError(f"{path}: the model has no MoE layers (check the config's expert settings)")
        layers: list[MoELayerInfo] = []
        modules: list[OffloadedExperts] = []
        shapes = set()
        for moe_index, (dec, block) in enumerate(blocks):
            old: Any = block.experts
            n_exp, two_i, hidden = old.gate_up_proj.shape
            shapes.add((n_exp, two_i // 2, hidden))
            top_k = int(getattr(block.gate, "top_k", getattr(config, "num_experts_per_tok", 1)))
            new = OffloadedExperts.from_stock(moe_index, old)  # shapes, act_fn, experts_implementation
            block.experts = new
            modules.append(new)
            layers.append(MoELayerInfo(moe_index, dec, n_exp, top_k))
        if len(shapes) != 1:
            raise ValueError(f"experts of different shapes across layers are not supported: {sorted(shapes)}")
        (num_experts, inter, hidden) = shapes.pop()

        layout = None
        sizing: ExpertSizing | None = None
        if qconfig is not None:
            layout = _quantized_layout(qconfig, layers, num_experts, inter, hidden)
            sizing = ExpertSizing(
                {(i.moe_index, e): tuple(layout.nbytes((i.moe_index, e), v)
                                         for v in range(len(qconfig.formats_of(i.moe_index, e))))
                 for i in layers for e in range(num_experts)},
                quality,
            )  # fmt: skip
            for m in modules:
                m.kernel = QuantizedKernel(m.act_fn)
                m.implementation = m.kernel.name
        elif quality != "lossless":
            raise ValueError(
                f"quality={quality!r} loads lower-precision copies of the experts, which {path} does not have; "
                "write a checkpoint with them first, e.g. `moe-engine quantize --model PATH --out DIR --bits 16 "
                "--copies int4-g64` (each expert at its stored precision plus an int4 copy), then load DIR"
            )
        if sizing is not None and (not sizing.uniform or quality != "lossless"):
            expert_bytes = sizing.max_bytes  # the largest copy a load may bring: the budget must hold one
            total = sizing.total_bytes
        else:
            if sizing is not None:
                layout.numel = sizing.max_bytes  # type: ignore[union-attr]
                sizing = None
            expert_bytes = layout.numel if layout is not None else 3 * inter * hidden * dtype.itemsize
            total = expert_bytes * num_experts * len(layers)  # every routed expert (checked against the files below)
        budget_bytes = resolve_budget(cfg.budget, total)
        if budget_bytes > total:
            warnings.warn(
                f"budget: requested {format_bytes(budget_bytes)} ({budget_bytes} bytes), all experts take "
                f"{format_bytes(total)} ({total} bytes), using {format_bytes(total)} ({total} bytes)",
                BudgetClampedWarning,
                stacklevel=2,
            )
            budget_bytes = total
        if budget_bytes < expert_bytes:
            raise ValueError(
                f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is smaller than one expert "
                f"({format_bytes(expert_bytes)}, {expert_bytes} bytes at {dtype}); give at least "
                f"{expert_bytes} bytes or a fraction >= {expert_bytes / total:.4f} of all expert bytes"
            )
        _load_dense_weights(model, store, adapter, dev, progress)
        model.to(dev)
        if qconfig is not None:
            from moe_engine.quant.checkpoint import quantized_expert_location

            locations = {
                (i.moe_index, e): quantized_expert_location(store, qconfig, i.moe_index, e)
                for i in layers for e in range(num_experts)
            }  # fmt: skip
        else:
            locations = _expert_locations(
                store, adapter, {i.decoder_layer: i.moe_index for i in layers}, num_experts, inter, hidden,
                num_decoder_layers=getattr(config, "num_hidden_layers", None),
            )  # fmt: skip

        if sizing is not None:  # entries of several sizes: the core keeps their bytes within the budget
            num_slots = min(budget_bytes // sizing.min_bytes, len(locations))
        else:
            num_slots = min(budget_bytes // expert_bytes, len(locations))
        if policy != "none":
            msg = working_set_warning(num_slots, len(layers), max(info.top_k for info in layers))
            if msg is not None:
                warnings.warn(msg, BudgetWarning, stacklevel=2)
        locate_variant = None
        if qconfig is not None:
            def locate_variant(key: tuple[int, int], variant: int) -> ExpertLocation:
                fmt = qconfig.formats_of(key[0], key[1])[variant]
                return quantized_expert_location(store, qconfig, key[0], key[1], fmt)

        mover: Mover
        slot_dtype = layout.dtype if layout is not None else dtype
        if dev.type == "cuda":
            # Several copy sizes: the pinned arena holds one size per expert, so copies stream from disk.
            requested = "disk" if sizing is not None and cfg.host_tier == "auto" else cfg.host_tier
            if sizing is not None and requested == "pinned":
                raise ValueError("host_tier='pinned' holds one copy per expert; with quality other than "
                                 "'lossless' or mixed expert sizes use host_tier='auto' (reads from disk)")
            plan = plan_host_tier(expert_bytes, len(locations), budget_bytes, requested=requested)
            (logger.warning if plan.fallback else logger.info)("%s", plan.reason)
            mover = CudaMover(
                store, sorted(locations.items()), expert_bytes // slot_dtype.itemsize, slot_dtype, dev, num_slots, plan,
                io_threads=io_threads, progress=progress,
            )  # fmt: skip
        else:
            mover = ThreadMover(store, io_threads=io_threads)
        pol = make_policy(
            "lru" if policy == "none" else policy, num_layers=len(layers), num_experts=num_experts, capacity=num_slots
        )
        core = Residency(
            num_slots=num_slots, policy=pol, num_layers=len(layers), expert_bytes=expert_bytes,
            budget_bytes=budget_bytes, keep_resident=policy != "none",
            size_of=sizing.size_of if sizing is not None else None,
        )  # fmt: skip
        cache = ExpertCache(
            core=core, intermediate=inter, hidden=hidden, dtype=dtype, device=dev, mover=mover,
            locate=locations.__getitem__, layout=layout, locate_variant=locate_variant,
        )  # fmt: skip
        pred = _build_predictor(predictor, model, adapter) if predictor is not None else None
        engine = Engine(
            config=cfg, store=store, core=core, cache=cache, mover=mover, layers=layers,
            budget_bytes=budget_bytes, predictor=pred, device=dev,
        )  # fmt: skip
        engine.sizing = sizing
        for m in modules:
            m.attach(engine)
        model.engine = engine
        _mark_phases(model, engine)
        model.__class__ = _offloaded_class(type(model))
        # Inference only: autograd through offloaded experts would keep views of slots that later copies
        # overwrite. Parameters are frozen so a plain forward records nothing (see README, "Gradients").
        model.requires_grad_(False)
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass
        model.eval()
        if guard is not None:
            guard.install(model)
        if ep_plan is not None or _process_group_size() > 1:
            from moe_engine.distributed import attach

            ep = attach(model, plan=ep_plan, mode=ep_mode)
            if preload:  # each rank fills its cache with its own experts only
                engine.preload(progress=progress, owned=ep.owned_experts())
        elif preload:
            engine.preload(progress=progress)
        return model
    except BaseException:
        store.close()
        raise


def _mark_phases(model: Any, engine: Engine) -> None:
    """Tell the engine, per forward pass of the decoder, whether it is a prefill (more than one new
    position per sequence) or a decode step: the two have separate expert policies."""
    decoder = model.get_decoder()

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            engine.mark_forward(int(x.shape[1]))

    decoder.register_forward_pre_hook(hook, with_kwargs=True)


def _process_group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _quantized_layout(qconfig: Any, layers: list[MoELayerInfo], num_experts: int, inter: int, hidden: int) -> PackedLayout:
    """The slot layout of a checkpoint written by ``moe-engine quantize``, checked against the model."""
    from moe_engine.quant.slots import expert_slot_bytes

    where = "config.json quantization_config"
    if list(qconfig.moe_layers) != [i.decoder_layer for i in layers]:
        raise CheckpointError(
            f"{where} names MoE layers {list(qconfig.moe_layers)} but the model has "
            f"{[i.decoder_layer for i in layers]}: re-run moe-engine quantize on the source checkpoint"
        )
    if qconfig.gate_up_shape != (2 * inter, hidden) or qconfig.down_shape != (hidden, inter):
        raise CheckpointError(
            f"{where} gives expert shapes {qconfig.gate_up_shape}/{qconfig.down_shape}, the model "
            f"{(2 * inter, hidden)}/{(hidden, inter)}: re-run moe-engine quantize on the source checkpoint"
        )
    if any(len(row) != num_experts for row in qconfig.experts):
        raise CheckpointError(f"{where} does not list a format for each of the {num_experts} experts of every layer")
    formats = qconfig.experts
    layout = PackedLayout(inter, hidden, lambda key, variant=0: qconfig.formats_of(key[0], key[1])[variant])
    layout.numel = max(expert_slot_bytes(f, inter, hidden) for f in {f for row in formats for f in row})
    return layout


def _build_predictor(predictor: Any, model, adapter: Adapter):
    from moe_engine.predictors import Predictor, make_predictor

    if isinstance(predictor, Predictor):
        return predictor
    if predictor == "cross_layer_gate":
        routers: list[Any] = [block.gate for _, block in moe_blocks(model)]
        biases = [getattr(r, "e_score_correction_bias", None) for r in routers]
        return make_predictor(
            "cross_layer_gate",
            router_weights=[r.weight.detach() for r in routers],
            score=adapter.router_score,
            biases=biases if any(b is not None for b in biases) else None,
        )
    return make_predictor(predictor)


class OffloadedModelMixin:
    """What an offloaded model adds to its transformers class: ``close()`` and the context manager,
    ``save_pretrained`` writing the experts too, ``num_parameters`` counting them, and dtype/device
    changes refused (``moe_engine.runtime.export``).

    ``state_dict()`` has every key of the stock model's, in its order: the non-expert tensors, and each
    MoE layer's fused experts read from the store only when their key is looked up
    (``moe_engine.runtime.export.OffloadedStateDict``). ``parameters()`` stays transformers' own: the
    routed experts are not parameters of the module tree (``num_parameters()`` counts them).
    """

    engine: Engine

    def close(self) -> None:
        """Stop the engine's threads, close its files, free its slots. Idempotent; using the model
        afterwards raises ``ModelClosedError``."""
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB", **kwargs) -> None:
        """Write a complete checkpoint (non-expert weights, every routed expert read from the store,
        config and generation config) that stock ``AutoModelForCausalLM.from_pretrained`` loads with
        identical logits; shards of at most ``max_shard_size``. The folder appears only when complete.
        Keyword arguments of transformers' ``save_pretrained`` other than ``max_shard_size`` are refused."""
        if kwargs:
            raise TypeError(
                f"save_pretrained of an offloaded moe-engine model takes save_directory and max_shard_size only; "
                f"got {', '.join(sorted(kwargs))}"
            )
        save_checkpoint(self, save_directory, max_shard_size)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """The stock model's state dict, experts included lazily (``OffloadedStateDict``). With
        ``destination``/``prefix``/``keep_vars`` (torch's recursive form) it is torch's, experts excluded."""
        dense = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        if args or kwargs:
            return dense
        return OffloadedStateDict(self, dense)  # type: ignore[arg-type]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count plus the routed experts held by the engine (they are frozen, so
        ``only_trainable=True`` counts none of them, as for every other frozen parameter)."""
        count = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)  # type: ignore[misc]
        return count if only_trainable else count + expert_parameter_count(self)  # type: ignore[arg-type]

    # dtype and device are fixed at load: the experts live in the engine's slots at that dtype/device.
    def to(self, *args, **kwargs):
        """A no-op when dtype and device are unchanged; any change raises ValueError (reload instead)."""
        check_to_arguments(self, args, kwargs)
        return self

    def cuda(self, device: int | torch.device | None = None):
        check_dtype_device(self, None, "cuda" if device is None else device)
        return self

    def cpu(self):
        check_dtype_device(self, None, "cpu")
        return self

    def half(self):
        check_dtype_device(self, torch.float16, None)
        return self

    def float(self):
        check_dtype_device(self, torch.float32, None)
        return self

    def double(self):
        check_dtype_device(self, torch.float64, None)
        return self

    def bfloat16(self):
        check_dtype_device(self, torch.bfloat16, None)
        return self


_OFFLOADED_CLASSES: dict[type, type] = {}


def _offloaded_class(cls: type) -> type:
    """A subclass of the model's class with ``OffloadedModelMixin``, made once per class and set on
    this instance only (no transformers class is changed). It keeps the class's name and module, so
    what transformers records from the class (``config.architectures`` on save) is unchanged."""
    sub = _OFFLOADED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (OffloadedModelMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _OFFLOADED_CLASSES[cls] = sub
    return sub

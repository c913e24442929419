"""The generated Mixtral-layout MoE checkpoint that ``moe-engine bench --large`` measures (2.2 GB of experts).

Owns: its shape (``CheckpointSpec``), writing it tensor by tensor, and caching it (``ensure_checkpoint``).

The checkpoint is what ``save_pretrained`` would write for a ``MixtralForCausalLM`` (same config,
same per-expert tensor names, sharded safetensors with ``model.safetensors.index.json``), but it is
produced tensor by tensor straight into the safetensors files, so generating 2+ GB never holds
more than one tensor in memory. Weights are random with a fixed seed (one generator per tensor, so
every tensor is reproducible on its own).

Glossary: *spec* is the shape of the model (``CheckpointSpec``); *expert bytes* are the bytes of
all routed experts' ``w1/w2/w3`` tensors, the part the engine offloads.

Weight scales: projections and routers are N(0, 0.02) (``initializer_range``), norms are ones, and
the token embeddings are N(0, ``embed_std``=1). The large embedding keeps the residual stream
dominant over each layer's update, as it is in trained models; this is what makes a layer's gate
input informative about the next layer's routing in real checkpoints. With every weight at 0.02
the residual stream would be re-drawn by each layer and routing would be unpredictable noise.

Example::

    from moe_engine.bench.checkpoint import CheckpointSpec, ensure_checkpoint
    path = ensure_checkpoint("~/.cache/moe-engine/bench-mixtral-2g", CheckpointSpec())
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LARGE_DIR = Path("~/.cache/moe-engine/bench-mixtral-2g")
SPEC_FILE = "bench_spec.json"
INDEX_FILE = "model.safetensors.index.json"
BYTES_PER_BF16 = 2


@dataclass(frozen=True)
class CheckpointSpec:
    """Shape and seed of the generated Mixtral-layout checkpoint (defaults: experts ~2.2 GB in bf16)."""

    num_layers: int = 8
    num_experts: int = 16
    experts_per_token: int = 2
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 4096
    seed: int = 0
    init_std: float = 0.02
    embed_std: float = 1.0

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_experts", "experts_per_token", "hidden_size",
                      "intermediate_size", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"CheckpointSpec.{field} must be positive, got {getattr(self, field)}")
        if self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token cannot exceed num_experts")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w1, w2, w3) in bf16."""
        return 3 * self.hidden_size * self.intermediate_size * BYTES_PER_BF16

    @property
    def total_expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    def hf_config(self) -> dict:
        """The ``config.json`` a ``MixtralForCausalLM`` of this shape saves."""
        from transformers import MixtralConfig

        config = MixtralConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            max_position_embeddings=4096,
            initializer_range=self.init_std,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        config.architectures = ["MixtralForCausalLM"]
        out = config.to_dict()
        out["dtype"] = "bfloat16"
        return out


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std = init_std), "embed" (std = embed_std) or "ones"

    @property
    def nbytes(self) -> int:
        n = BYTES_PER_BF16
        for d in self.shape:
            n *= d
        return n


def shard_layout(spec: CheckpointSpec) -> list[tuple[str, list[TensorSpec]]]:
    """``[(shard file name, tensors)]``: one shard per decoder layer, then one for the rest."""
    H, F, E = spec.hidden_size, spec.intermediate_size, spec.num_experts  # F: FFN width
    kv = spec.num_kv_heads * spec.head_dim
    n_shards = spec.num_layers + 1
    shards = []
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        tensors = [
            TensorSpec(f"{p}.input_layernorm.weight", (H,), "ones"),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (H, H), "normal"),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv, H), "normal"),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv, H), "normal"),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (H, H), "normal"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "ones"),
            TensorSpec(f"{p}.block_sparse_moe.gate.weight", (E, H), "normal"),
        ]
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors += [
                TensorSpec(f"{q}.w1.weight", (F, H), "normal"),
                TensorSpec(f"{q}.w2.weight", (H, F), "normal"),
                TensorSpec(f"{q}.w3.weight", (F, H), "normal"),
            ]
        shards.append((f"model-{layer + 1:05d}-of-{n_shards:05d}.safetensors", tensors))
    rest = [
        TensorSpec("model.embed_tokens.weight", (spec.vocab_size, H), "embed"),
        TensorSpec("model.norm.weight", (H,), "ones"),
        TensorSpec("lm_head.weight", (spec.vocab_size, H), "normal"),
    ]
    shards.append((f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors", rest))
    return shards


def _tensor_bytes(tensor: TensorSpec, spec: CheckpointSpec, index: int) -> memoryview:
    """The bf16 bytes of one tensor, drawn from its own seeded generator."""
    import torch

    if tensor.init == "ones":
        t = torch.ones(tensor.shape, dtype=torch.bfloat16)
    else:
        std = spec.embed_std if tensor.init == "embed" else spec.init_std
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
        t = (torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std).to(torch.bfloat16)
    return t.reshape(-1).view(torch.uint8).numpy().data


def _write_shard(path: Path, tensors: list[TensorSpec], spec: CheckpointSpec, first_index: int,
                 progress) -> None:
    """Write one safetensors file (header, then each tensor's bytes as it is generated)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so tensor data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, t in enumerate(tensors):
            f.write(_tensor_bytes(t, spec, first_index + i))
            progress.update(t.nbytes)
        f.flush()
        os.fsync(f.fileno())
        # Written data would otherwise sit in the page cache and make the first benchmark run warm.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_checkpoint(out_dir: str | os.PathLike, spec: CheckpointSpec, *, progress: bool = True) -> Path:
    """Write the checkpoint into ``out_dir`` (created; must not exist). Not atomic: see ensure_checkpoint."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True)
    layout = shard_layout(spec)
    total = sum(t.nbytes for _, tensors in layout for t in tensors)
    weight_map = {}
    index = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              desc="generating checkpoint") as bar:
        for shard_name, tensors in layout:
            _write_shard(out / shard_name, tensors, spec, index, bar)
            index += len(tensors)
            weight_map.update({t.name: shard_name for t in tensors})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(spec.hf_config(), indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (out / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2, sort_keys=True))
    return out


def read_spec(path: Path) -> CheckpointSpec | None:
    try:
        return CheckpointSpec(**json.loads((path / SPEC_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_checkpoint(path: str | os.PathLike = DEFAULT_LARGE_DIR, spec: CheckpointSpec | None = None,
                      *, progress: bool = True) -> Path:
    """Return ``path`` holding a checkpoint of ``spec``, generating it first if needed.

    Generation writes into a temporary sibling folder renamed into place at the end, so ``path``
    either holds a complete checkpoint or does not exist; a lock file serialises concurrent callers.
    A cached checkpoint of another spec is replaced.
    """
    spec = spec or CheckpointSpec()
    final = Path(path).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists() and read_spec(final) == spec:
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        try:
            write_checkpoint(tmp, spec, progress=progress)
            if final.exists():
                old = final.parent / f".{final.name}.tmp-old-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# Quantized systems of the bench: the format each one loads (a uniform copy of the benchmarked checkpoint).
# System -> what its checkpoint holds: one format for every expert, or "stored+COPY": each expert at its
# stored precision plus a lower-precision copy (the per-miss quality setting chooses; "fast" loads copies).
QUANTIZED_SYSTEMS = {"int8": "int8", "int4": "int4-g64", "fast": "stored+int4-g64"}
# Where the quantized copies go (outside the source tree); MOE_ENGINE_QUANTIZED_DIR overrides it.
QUANTIZED_ROOT = Path(os.environ.get("MOE_ENGINE_QUANTIZED_DIR", "~/.cache/moe-engine/bench/quantized"))


def _source_stamp(model_path: Path) -> dict:
    files = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {"source": str(model_path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def ensure_quantized(model_path: str | os.PathLike, fmt: str, root: str | os.PathLike | None = None,
                     *, progress: bool = True) -> Path:
    """A copy of ``model_path`` with every expert in ``fmt`` (``moe_engine.quant``), written once under
    ``root`` (outside the source tree) and rewritten when the source's files change."""
    import hashlib

    from moe_engine.quant.checkpoint import open_source, uniform_formats, write_quantized_checkpoint

    src = Path(model_path).expanduser()
    stamp = _source_stamp(src)
    digest = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    if root is None:
        root = os.environ.get("MOE_ENGINE_QUANTIZED_DIR") or QUANTIZED_ROOT
    out = Path(root).expanduser() / f"{src.name}-{digest}-{fmt}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two bench processes never write the same copy
        if not (out / "config.json").exists():
            if out.exists():
                shutil.rmtree(out)
            with open_source(src) as source:
                own, _, copy = fmt.partition("+")
                if copy:  # stored precision plus a copy per expert
                    own = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(source.dtype)]
                    copies = [[[copy] for _ in range(source.num_experts)] for _ in range(source.num_layers)]
                    write_quantized_checkpoint(source, out, uniform_formats(source, own), copies=copies,
                                               allocation={"method": "copies", "copy": copy}, progress=progress)
                else:
                    write_quantized_checkpoint(source, out, uniform_formats(source, fmt),
                                               allocation={"method": "uniform", "format": fmt}, progress=progress)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Generate the benchmark's large random Mixtral-layout checkpoint.")
    parser.add_argument("--out", default=str(DEFAULT_LARGE_DIR), help="folder to create (default: %(default)s)")
    for field in dataclasses.fields(CheckpointSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"default: {field.default}")
    args = parser.parse_args(argv)
    spec = CheckpointSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CheckpointSpec)})
    path = ensure_checkpoint(args.out, spec)
    print(f"{path}: {spec.total_expert_bytes / 1e9:.2f} GB of experts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tiny checkpoints for the tests, made with stock transformers and ``save_pretrained``.

Each *variant* names a ``config.model_type`` plus the config overrides that exercise one feature of
that architecture (gated shared expert, dense layers via ``mlp_only_layers`` / ``decoder_sparse_step``,
group-limited routing, ...). Weights come from a fixed seed, so the same variant always gives the same
checkpoint. Nothing here imports ``moe_engine``: these are the stock models the engine is compared to.

Sizes: H = hidden size (32), I = routed expert FFN width, E = routed experts per MoE layer, K = top-k (2).

Example::

    path = make_tiny_moe("mixtral", tmp_path / "mixtral")          # fp32 safetensors + config.json
    n = expert_bytes(AutoConfig.from_pretrained(path))             # bytes of one routed expert
    path = make_tiny_moe("olmoe", tmp_path / "sharded", max_shard_size="40KB")  # index.json + shards
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

VOCAB_SIZE = 100
HIDDEN = 32
SEED = 1234
# Larger than transformers' default 0.02 so router scores are well separated: no near-ties that a
# different (but exact up to rounding) summation order could flip.
INIT_STD = 0.1

# Special token ids shared by the tiny models and the tiny tokenizer.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=INIT_STD,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

# variant name -> (model_type, overrides on top of _COMMON)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": (
        "mixtral",
        dict(intermediate_size=64, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    ),
    # Gated shared expert; norm_topk_prob False (Qwen1.5-MoE's default).
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            intermediate_size=64,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    # Layer 1 dense through mlp_only_layers: MoE layers are 0, 2, 3.
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            intermediate_size=64,
            moe_intermediate_size=48,
            num_hidden_layers=4,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
    # decoder_sparse_step=2: only layers 1 and 3 are MoE, 0 and 2 are dense.
    "qwen3_moe_step2": (
        "qwen3_moe",
        dict(
            intermediate_size=64,
            moe_intermediate_size=48,
            num_hidden_layers=4,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[],
        ),
    ),
    "olmoe": (
        "olmoe",
        dict(
            intermediate_size=48,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    # Sigmoid scores + nonzero e_score_correction_bias (set after init), group-limited top-k
    # (4 groups, 2 kept), 1 shared expert, first layer dense, routed_scaling_factor 2.5.
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_mtp_layers=0,
        ),
    ),
    # Softmax scores, group_limited_greedy top-k, 2 shared experts, first layer dense.
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
}

#: One variant per supported architecture (the lossless matrix runs over these).
ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2")

#: The model types the engine must support; anything else must be refused with a message listing them.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "deepseek_v2",
)


def tiny_config(variant: str, **overrides: Any) -> PretrainedConfig:
    """The config of ``variant`` (a key of VARIANTS), with ``overrides`` applied last."""
    model_type, extra = VARIANTS[variant]
    kwargs = {**_COMMON, **extra, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def _save(
    model: torch.nn.Module, out_dir: Path, max_shard_size: int | str | None, dtype: torch.dtype
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.config.dtype = dtype
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    if max_shard_size is not None and not (out_dir / "model.safetensors.index.json").exists():
        raise AssertionError(f"max_shard_size={max_shard_size!r} did not shard the checkpoint in {out_dir}")
    return out_dir


def build_model(config: PretrainedConfig, seed: int = SEED) -> torch.nn.Module:
    """A stock transformers model for ``config``, initialised from ``seed`` (fp32, eval mode)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.model_type == "deepseek_v3":
        # transformers zero-initialises the correction bias; a nonzero one makes it matter for routing.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "e_score_correction_bias"):
                    bias = gate.e_score_correction_bias
                    bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return model.eval()


def make_tiny_moe(
    variant: str,
    out_dir: str | Path,
    *,
    seed: int = SEED,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Save a tiny MoE checkpoint of ``variant`` into ``out_dir`` and return the path.

    ``max_shard_size`` (e.g. ``"40KB"``) shards the weights and writes ``model.safetensors.index.json``.
    ``tokenizer=True`` saves a tiny word-level tokenizer beside the weights (for the CLI).
    """
    config = tiny_config(variant, **overrides)
    path = _save(build_model(config, seed), Path(out_dir), max_shard_size, dtype)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path


def make_tiny_llama(out_dir: str | Path, *, seed: int = SEED) -> Path:
    """A tiny dense (non-MoE) Llama checkpoint."""
    config = AutoConfig.for_model("llama", intermediate_size=64, num_hidden_layers=2, **_COMMON)
    return _save(build_model(config, seed), Path(out_dir), None, torch.float32)


def make_tiny_unsupported_moe(out_dir: str | Path, *, seed: int = SEED) -> Path:
    """A tiny MoE checkpoint of an architecture the engine does not support (PhiMoE)."""
    config = AutoConfig.for_model(
        "phimoe",
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        **_COMMON,
    )
    return _save(build_model(config, seed), Path(out_dir), None, torch.float32)


# ----------------------------------------------------------------------------------------------------
# sizes


def routed_experts_per_layer(config: PretrainedConfig) -> int:
    for name in ("num_local_experts", "n_routed_experts", "num_experts"):
        n = getattr(config, name, None)
        if n:
            return int(n)
    raise ValueError(f"{config.model_type}: no routed-expert count in config")


def expert_intermediate_size(config: PretrainedConfig) -> int:
    """I: the FFN width of one routed expert."""
    if config.model_type in ("mixtral", "olmoe"):
        return int(config.intermediate_size)
    return int(config.moe_intermediate_size)


def moe_layer_indices(config: PretrainedConfig) -> list[int]:
    """Decoder-layer indices whose MLP is a sparse MoE block."""
    n = config.num_hidden_layers
    mt = config.model_type
    if mt in ("qwen2_moe", "qwen3_moe"):
        dense = set(config.mlp_only_layers or [])
        return [i for i in range(n) if i not in dense and (i + 1) % config.decoder_sparse_step == 0]
    if mt in ("deepseek_v3", "deepseek_v2"):
        return list(range(config.first_k_dense_replace, n))
    return list(range(n))


def expert_bytes(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one routed expert's three matrices (gate, up: [I, H]; down: [H, I]) in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 3 * int(config.hidden_size) * expert_intermediate_size(config) * itemsize


def total_expert_bytes(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all routed experts of all MoE layers (shared experts are not routed experts)."""
    return expert_bytes(config, dtype) * routed_experts_per_layer(config) * len(moe_layer_indices(config))


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------------
# tokenizer

WORDS = (
    "the a an of to and in is it that was for on are with as he she they we you i his her at be this "
    "have from or one had by word but not what all were when your can said there use each which do how "
    "their if will up other about out many then them these so some would make like him into time has "
    "look two more write go see number no way could people my than first water been call who oil its "
    "now find hello world"
).split()


def save_tiny_tokenizer(out_dir: str | Path) -> None:
    """A word-level tokenizer over ``VOCAB_SIZE`` ids, saved with ``save_pretrained``.

    ids 0..3 are [PAD], <s>, </s>, [UNK]; the rest are lowercase English words split on whitespace.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<s>", "</s>", "[UNK]"]
    words = list(dict.fromkeys(WORDS))[: VOCAB_SIZE - len(specials)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    assert len(vocab) <= VOCAB_SIZE and vocab["[UNK]"] == UNK_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        padding_side="left",
    )
    fast.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------------------------------
# FP8 block-scaled checkpoints (DeepSeek-V3/R1 format)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantization: per ``bm x bn`` block (edge blocks partial), ``scale = amax / 448``,
    stored ``weight / scale`` as float8_e4m3fn. Returns ``(fp8 [R, C], scale_inv fp32 [ceil(R/bm), ceil(C/bn)])``."""
    bm, bn = block
    rows, cols = weight.shape
    gr, gc = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(gr * bm, gc * bn, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    amax = padded.reshape(gr, bm, gc, bn).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return (weight.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference dequantization in fp32: ``weight.float() * scale`` of each element's block."""
    bm, bn = block
    rows, cols = weight.shape
    full = scale_inv.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return weight.float() * full


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _write_checkpoint(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    """Write ``tensors`` as one file or ``shards`` files (names dealt round-robin) plus an index."""
    from safetensors.torch import save_file

    for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        old.unlink()
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / "model.safetensors"), {"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(out_dir / fname), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_fp8_deepseek_v3(
    out_dir: str | Path,
    *,
    block: tuple[int, int] = (16, 16),
    partial_blocks: bool = False,
    shards: int = 1,
    seed: int = SEED,
) -> Path:
    """The tiny ``deepseek_v3`` variant saved in DeepSeek-V3's FP8 format.

    Every 2-D Linear weight (attention projections, routed and shared experts, the dense MLP; not the
    embeddings, the router or lm_head, as in DeepSeek's release) whose dims are multiples of ``block``
    is stored as float8_e4m3fn with a float32 ``<name>_scale_inv`` of one scale per block;
    ``partial_blocks=True`` quantizes the others too, with partial edge blocks (as DeepSeek's
    ``kv_a_proj_with_mqa [576, 7168]`` at 128). config.json gets ``quantization_config``
    ``{"quant_method": "fp8", "weight_block_size": block, ...}``; ``shards > 1`` deals the tensors over
    that many files (a weight and its scale usually in different ones) with an index.
    """
    out_dir = Path(out_dir)
    make_tiny_moe("deepseek_v3", out_dir, seed=seed)
    tensors = _read_checkpoint(out_dir)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        linear = name.endswith(("_proj.weight", "_mqa.weight")) and t.ndim == 2
        if linear and (partial_blocks or (t.shape[0] % block[0] == 0 and t.shape[1] % block[1] == 0)):
            out[name], out[name + "_scale_inv"] = _fp8_block_quantize(t, block)
        else:
            out[name] = t
    _write_checkpoint(out, out_dir, shards)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def make_fp8_reference(fp8_dir: str | Path, out_dir: str | Path) -> Path:
    """An fp32 checkpoint of the same model whose FP8 weights are replaced by their reference
    dequantization (``fp8_reference_dequantize``); no quantization_config: stock transformers loads it."""
    fp8_dir, out_dir = Path(fp8_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((fp8_dir / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    tensors = _read_checkpoint(fp8_dir)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = t if scale is None else fp8_reference_dequantize(t, scale, block)  # type: ignore[arg-type]
    _write_checkpoint(out, out_dir, 1)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if (fp8_dir / "generation_config.json").exists():
        (out_dir / "generation_config.json").write_text((fp8_dir / "generation_config.json").read_text())
    return out_dir

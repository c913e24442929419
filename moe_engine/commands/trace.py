"""``moe-engine trace``: record a MoE model's routing on some text into a ``moe-routing-trace/1`` file."""

from __future__ import annotations

import argparse

NAME = "trace"
HELP = "record which experts a MoE model routes each token to (a routing trace .npz)"
DESCRIPTION = """\
Run a Hugging Face MoE checkpoint over a text and write its routing in the moe-routing-trace/1 format
(numpy .npz: expert_ids [T, L, K] highest weight first, expert_weights [T, L, K] router probabilities,
sequence_starts [S+1], meta JSON). With --gate-inputs it also stores gate_inputs [T, L, H] (float16),
each MoE layer's router input, for training and evaluating expert predictors.

The text is tokenised and cut into sequences of --seq-len tokens, each run as its own context (batched
without padding). The model runs in full (no offloading); use a machine that holds it.

examples:
  moe-engine trace --prompt "And the king said" --out trace.npz
  moe-engine trace --text corpus.txt --out val.npz --gate-inputs --max-tokens 4096
  moe-engine trace --model ./Mixtral-8x7B --text law.txt --out law.npz --dtype bfloat16 --device cuda
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", default=None, help="UTF-8 text file to run the model on")
    src.add_argument("--prompt", default=None, help="text given on the command line instead of --text")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument(
        "--gate-inputs", action="store_true", help="also store each MoE layer's router input (float16)"
    )
    p.add_argument("--max-tokens", type=int, default=0, help="trace at most this many tokens (default: all)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="compute dtype: float32, bfloat16, float16 or auto (default float32)",
    )
    p.add_argument(
        "--dataset", default=None, help="dataset name stored in meta (default: the text file name)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_engine.cli import UserError, model_path_arg
    from moe_engine.offline.trace_recorder import record_trace, split_into_sequences

    model_path = model_path_arg(args.model)
    if args.seq_len < 1:
        raise UserError("--seq-len must be at least 1")
    if args.max_tokens < 0:
        raise UserError("--max-tokens must be 0 (all) or more")
    out = Path(args.out)
    if not out.parent.exists():
        raise UserError(f"output folder {out.parent} does not exist")
    if args.text is not None:
        tp = Path(args.text)
        if not tp.is_file():
            raise UserError(f"--text {tp} is not a file")
        text = tp.read_text(encoding="utf-8", errors="replace")
        dataset = args.dataset or tp.name
    else:
        text = args.prompt
        dataset = args.dataset or "prompt"
    if not text.strip():
        raise UserError("the text is empty; nothing to trace")
    dtypes: dict[str, torch.dtype | str] = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "auto": "auto",
    }
    if args.dtype not in dtypes:
        raise UserError(f"--dtype must be one of {', '.join(dtypes)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"no usable tokenizer in {model_path} ({exc})") from None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtypes[args.dtype])
    model = model.to(device)  # type: ignore[arg-type]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    seqs = split_into_sequences(ids, args.seq_len)
    trace = record_trace(
        model,
        seqs,
        gate_inputs=args.gate_inputs,
        batch_size=max(1, args.batch_size),
        meta={
            "model": str(model_path) if args.model else "moe-engine default model",
            "dataset": dataset,
            "source": "moe-engine trace",
            "seq_len": args.seq_len,
            "dtype": args.dtype,
        },
        progress=True,
    )
    trace.save(out)
    extra = f", gate_inputs {tuple(trace.gate_inputs.shape)}" if trace.gate_inputs is not None else ""
    print(
        f"wrote {out}: {trace.num_tokens} tokens in {trace.num_sequences} sequences, "
        f"{trace.num_layers} MoE layers, top-{trace.top_k} of {trace.num_experts} experts{extra}"
    )
    return 0

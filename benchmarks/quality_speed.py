"""Decode speed and perplexity of the per-miss ``quality`` settings, on the default model, in one run.

The engine loads a checkpoint holding each expert at its stored precision (bf16) plus a lower-precision
copy (``--copy``, default int4 group 64), written once with ``moe_engine.quant.checkpoint`` (the code
behind ``moe-engine quantize``) under ``--work``. For each system it measures, at the same budget (a
fraction of the stored expert bytes, default 0.1: below one token's working set of the default model):

* ``shipped``: ``moe_engine.from_pretrained(default model)``, the engine as it ships (lossless);
* ``lossless`` / ``balanced`` / ``fast``: the copies checkpoint at ``quality=...``
  (``moe_engine.runtime.quality``): lossless always loads bf16, balanced loads the copy on a demand miss
  and bf16 on a prefetch, fast always loads the copy;
* ``resident``: the shipped engine at budget 1.0 (every expert stays resident once read): the decode
  speed no quality setting can beat on this model, since the copies only save loads. Its ratio to
  lossless is the ceiling of ``fast``'s speed-up here.
* ``fast_resident``: the copies checkpoint at ``quality="fast"`` with every copy resident: ``fast``'s
  speed with no load at all.

The offline bound (``bound`` in the JSON): each decode step's routing is recorded, and Belady's optimum
(``moe_engine.offline.simulator.belady_hit_rate``, the fewest loads any policy, with or without prefetch,
can do with the system's slots) is compared with the loads the system made. The decode time each load
costs here is measured as (1 / speed - 1 / resident speed) / loads per token, against the same copies
all resident; ``fast`` making only Belady's loads at that cost would decode at ``projected_tok_s``, and
its ratio to the measured lossless speed is the most this machine allows ``fast`` (a projection: it
assumes the per-load cost stays what was measured).

Decode: greedy generation of ``--new-tokens`` after a ``--prompt-tokens`` prompt from the validation text;
decode tokens/s counts the tokens after the first (prefill excluded), timed per token; ``--repeats``
rounds interleave the systems and each is reported by its median. Perplexity: the engine itself scores
``--eval-tokens`` validation tokens (windows of 256, no KV cache), so the figure includes exactly the
copies each quality loads. Validation text: the held-out works and books of
``benchmarks/train_default_model.py`` (never trained on). torch runs on ``--threads`` threads (default 1).

Example::

    python -m moe_engine.benchmarks.quality_speed --out benchmarks/results/quality_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = Path("~/.cache/moe-engine/bench/quality_speed")
SYSTEMS = ("shipped", "lossless", "balanced", "fast", "resident", "fast_resident")


def _log(msg: str) -> None:
    print(f"[quality_speed] {msg}", file=sys.stderr, flush=True)


def _copies_checkpoint(work: Path, copy: str) -> Path:
    import moe_engine
    from moe_engine.quant.checkpoint import open_source, write_quantized_checkpoint

    out = work / f"default-bf16+{copy}"
    if (out / "config.json").exists():
        return out
    with open_source(moe_engine.default_model_path()) as src:
        own = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(src.dtype)]
        formats = [[own] * src.num_experts for _ in range(src.num_layers)]
        copies = [[[copy] for _ in range(src.num_experts)] for _ in range(src.num_layers)]
        write_quantized_checkpoint(src, out, formats, copies=copies, allocation={"method": "copies", "copy": copy})
    return out


def _load(system: str, ckpt: Path, budget: float, threads: int):
    import moe_engine

    if system in ("shipped", "resident"):
        budget = 1.0 if system == "resident" else budget
        return moe_engine.from_pretrained(moe_engine.default_model_path(), budget=budget, device="cpu", threads=threads)
    # The same bytes as the shipped engine: a fraction of the *stored* expert bytes.
    stored = _stored_expert_bytes()
    if system == "fast_resident":
        system, budget = "fast", 1.0  # the copies are smaller than the stored experts: all of them fit
    return moe_engine.from_pretrained(ckpt, budget=int(budget * stored), device="cpu", threads=threads, quality=system)


def _stored_expert_bytes() -> int:
    import moe_engine
    from moe_engine.bench.probes import checkpoint_bytes

    return checkpoint_bytes(str(moe_engine.default_model_path())).expert_bytes


def _decode(model, prompt, new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from moe_engine.bench.worker import _decode_delta, _scalar_stats
    from moe_engine.offline.trace_recorder import RouterHooks

    times: list[float] = []
    routing: list[np.ndarray] = []  # [L, K] per decode step
    first: list[Any] = []  # the stats once the prefill (and its token) is done

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            times.append(time.perf_counter())
            ids = hooks.take()[0]  # the routing of the forward pass that made this token
            if len(times) == 1:
                first.append(_scalar_stats(model.engine.stats()))
            else:
                routing.append(ids[0].numpy())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model.engine.reset_stats()
    hooks = RouterHooks(model, gate_inputs=False)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([Stamp()]))
    finally:
        hooks.remove()
    decode_s = times[-1] - times[0]
    st = model.engine.stats()
    decode = _decode_delta(first[0], _scalar_stats(st))  # the bench's decode-only counters
    return {
        "prefill_s": times[0] - t0,
        "decode_tok_s": (len(times) - 1) / decode_s if decode_s > 0 else None,
        "tokens": out[0, prompt.shape[1]:].tolist(),
        "hit_rate": st.hit_rate, "misses": st.misses, "reduced_loads": st.reduced_loads,
        "bytes_moved": st.bytes_moved, "stall_s": st.stall_seconds, "peak_resident_bytes": st.peak_resident_bytes,
        "budget_bytes": st.budget_bytes, "num_slots": st.num_slots,
        # every copy started during decode: demand loads and prefetches
        "decode_loads_per_token": (decode["misses"] + decode["prefetches"]) / max(1, len(times) - 1),
        "routing": np.stack(routing),
    }  # fmt: skip


def _bound(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Belady's fewest loads for ``lossless`` and ``fast`` on their own decode routing and slots, the
    per-load decode cost measured against the same copies all resident, and ``fast``'s projected speed
    with only Belady's loads (see the module docstring)."""
    from moe_engine.offline.simulator import belady_hit_rate

    out: dict[str, Any] = {}
    for system, resident in (("lossless", "resident"), ("fast", "fast_resident")):
        r, base = results[system], results[resident]
        ids = r["routing"]
        accesses = ids.shape[1] * ids.shape[2]  # per token
        belady = belady_hit_rate(ids, r["num_slots"])[0]
        loads = r["decode_loads_per_token"]
        per_load = (1 / r["decode_tok_s"] - 1 / base["decode_tok_s"]) / loads if loads else 0.0
        best = (1 - belady) * accesses
        out[system] = {"slots": r["num_slots"], "loads_per_token": loads, "belady_hit_rate": belady,
                       "belady_loads_per_token": best, "per_load_ms": 1e3 * per_load,
                       "projected_tok_s": 1 / (1 / base["decode_tok_s"] + best * per_load)}  # fmt: skip
    out["fast_projected_vs_lossless"] = out["fast"]["projected_tok_s"] / results["lossless"]["decode_tok_s"]
    return out


def _perplexity(model, val: np.ndarray, tokens: int, seq_len: int = 256) -> dict[str, Any]:
    import torch

    n_win = max(1, min((len(val) - 1) // seq_len, tokens // seq_len))
    nll, count = 0.0, 0
    model.engine.reset_stats()
    with torch.no_grad():
        for w in range(n_win):
            x = torch.from_numpy(val[w * seq_len : w * seq_len + seq_len + 1].astype(np.int64))[None]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
            count += seq_len
    st = model.engine.stats()
    return {"ppl": float(np.exp(nll / count)), "tokens": count, "reduced_loads": st.reduced_loads,
            "misses": st.misses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_WORK / "quality_speed.json"), help="JSON results path")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="where the copies checkpoint is written (once)")
    p.add_argument("--copy", default="int4-g64", help="format of the lower-precision copy (default int4-g64)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the stored expert bytes (default 0.1)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens scored per system")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--corpus-cache", default=str(REPO / ".cache" / "corpus"))
    args = p.parse_args(argv)

    import torch
    from moe_engine.benchmarks.train_default_model import (
        encode_docs,
        fetch_corpus,
        load_documents,
        split_documents,
    )
    from transformers import AutoTokenizer

    import moe_engine

    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = _copies_checkpoint(work, args.copy)
    tok = AutoTokenizer.from_pretrained(moe_engine.default_model_path())
    _, val_docs = split_documents(load_documents(fetch_corpus(Path(args.corpus_cache))))
    val = encode_docs(tok, val_docs)
    prompt = torch.from_numpy(val[: args.prompt_tokens].astype(np.int64))[None]

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for rep in range(args.repeats):
        for system in SYSTEMS:
            model = _load(system, ckpt, args.budget, args.threads)
            with model:
                r = _decode(model, prompt, args.new_tokens)
            runs[system].append(r)
            _log(f"round {rep + 1}: {system}: decode {r['decode_tok_s']:.1f} tok/s, hit rate {r['hit_rate']:.3f}, "
                 f"reduced loads {r['reduced_loads']}, moved {r['bytes_moved'] / 2**20:.1f} MiB")
    results: dict[str, Any] = {}
    reps: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        med = statistics.median(r["decode_tok_s"] for r in runs[system])
        rep = reps[system] = min(runs[system], key=lambda r: abs(r["decode_tok_s"] - med))
        with _load(system, ckpt, args.budget, args.threads) as model:
            quality = _perplexity(model, val, args.eval_tokens)
        results[system] = {**{k: v for k, v in rep.items() if k != "routing"}, "decode_tok_s_runs": [r["decode_tok_s"] for r in runs[system]], **{
            "perplexity": quality["ppl"], "ppl_tokens": quality["tokens"], "ppl_reduced_loads": quality["reduced_loads"]}}
        _log(f"{system}: median decode {med:.1f} tok/s, perplexity {quality['ppl']:.3f}")
    bound = _bound(reps)
    base = results["lossless"]
    ratios = {
        s: {"decode_vs_lossless": results[s]["decode_tok_s"] / base["decode_tok_s"],
            "decode_vs_shipped": results[s]["decode_tok_s"] / results["shipped"]["decode_tok_s"],
            "ppl_increase_vs_shipped": results[s]["perplexity"] / results["shipped"]["perplexity"] - 1}
        for s in SYSTEMS
    }  # fmt: skip
    report = {
        "benchmark": "quality_speed", "budget_fraction_of_stored": args.budget, "copy": args.copy,
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "eval_tokens": args.eval_tokens, "machine": platform.platform(),
        "torch": torch.__version__, "results": results, "ratios": ratios, "bound": bound,
        "acceptance": {"fast_decode_vs_lossless": ratios["fast"]["decode_vs_lossless"], "bar_decode": 1.5,
                       "ceiling_resident_vs_lossless": ratios["resident"]["decode_vs_lossless"],
                       "fast_belady_projected_vs_lossless": bound["fast_projected_vs_lossless"],
                       "fast_ppl_increase": ratios["fast"]["ppl_increase_vs_shipped"], "bar_ppl": 0.05},
    }  # fmt: skip
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'system':<13} {'decode tok/s':>12} {'x lossless':>10} {'ppl':>8} {'ppl +%':>7} {'reduced':>8} {'MiB moved':>9}")
    for s in SYSTEMS:
        r = results[s]
        print(f"{s:<13} {r['decode_tok_s']:>12.1f} {ratios[s]['decode_vs_lossless']:>10.2f} {r['perplexity']:>8.3f} "
              f"{100 * ratios[s]['ppl_increase_vs_shipped']:>7.2f} {r['reduced_loads']:>8} {r['bytes_moved'] / 2**20:>9.1f}")
    for s in ("lossless", "fast"):
        b = bound[s]
        print(f"{s}: {b['slots']} slots, {b['loads_per_token']:.1f} loads per decode token (Belady's fewest "
              f"{b['belady_loads_per_token']:.1f}), {b['per_load_ms']:.2f} ms of decode per load; with Belady's loads "
              f"{b['projected_tok_s']:.1f} tok/s")
    print(f"fast with Belady's loads, projected: {bound['fast_projected_vs_lossless']:.2f}x the measured lossless speed")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

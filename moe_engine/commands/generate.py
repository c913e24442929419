"""``moe-engine generate``: stream text from a MoE checkpoint with experts offloaded, then one stats line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "generate"
HELP = "generate text from a MoE checkpoint with experts offloaded under a memory budget"
DESCRIPTION = """\
Generate text with a Hugging Face MoE checkpoint whose routed experts are kept in a fast-tier cache
of at most --budget bytes and streamed from the checkpoint files (the slow tier) on demand.

With no arguments it runs the embedded default model (a small Qwen3-MoE trained by this project) at
25 % of its expert bytes, so offloading is exercised. The text streams as it is generated and a final
line reports decode speed, cache hit rate, bytes moved and peak memory.

examples:
  moe-engine generate
  moe-engine generate --model ./Mixtral-8x7B --budget 12GiB --prompt "The capital of France is"
  moe-engine generate --budget 0.5 --policy lfu --predictor none --max-new-tokens 64
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--prompt", default=None, help="prompt text (default: the default model's sample prompt)")
    p.add_argument(
        "--budget",
        default="0.25",
        help="fast-tier bytes for experts: bytes, a size like 512MB / 2GiB, or a fraction of all expert bytes "
        "like 0.25 (default 0.25)",
    )
    p.add_argument("--policy", default="auto", help="eviction policy: auto, lru, lfu, ... or none (no cache) (default auto)")
    p.add_argument(
        "--predictor",
        default="cross_layer_gate",
        help="prefetch predictor, or 'none' to load experts only on demand (default cross_layer_gate)",
    )
    p.add_argument("--prefetch-distance", type=int, default=1, help="MoE layers ahead to prefetch (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--page-cache", action="store_true", help="let the OS page cache keep expert file pages")
    p.add_argument("--prefill-policy", default="stream", choices=["stream", "shared"],
                   help="how the prompt's forward pass uses the cache: stream (read the next layer ahead, "
                        "keep the decode working set; default) or shared (cached like a decode step)")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="start with an empty expert cache (default: fill the budget with experts while loading, "
                        "each MoE layer an equal share, so the first prompt does not start cold)")
    p.add_argument("--quality", default="lossless", choices=["lossless", "balanced", "fast"],
                   help="which stored copy of an expert a load brings, for checkpoints from `moe-engine quantize "
                   "--copies`: lossless (its own format), balanced (a demand miss loads the smallest copy, a "
                   "prefetch the own format), fast (always the smallest) (default lossless)")
    p.add_argument("--guardrail", type=float, default=None, metavar="KL",
                   help="with --quality balanced/fast: every --guardrail-every decode steps compare the next-token "
                   "distribution with full-precision experts; above KL (nats) the worst layers go back to full "
                   "precision (default: off)")
    p.add_argument("--guardrail-every", type=int, default=16, metavar="N", help="decode steps between guardrail checks (default 16)")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism: spawn N local ranks (gloo on CPU, NCCL on GPUs), each serving its "
                   "experts; see `python -m moe_engine.distributed --help` for torchrun / multi-node")
    p.add_argument("--plan", default=None, help="with --ep: moe-placement/1 plan from `moe-engine plan` (default: round-robin)")
    p.add_argument("--ep-mode", default="standard", choices=["standard", "coherent"],
                   help="with --ep: standard (dispatch + combine, two all-to-alls per MoE layer) or coherent (one)")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import TextStreamer

    import moe_engine
    from moe_engine.runtime.config import format_bytes, parse_budget

    if args.model is None:
        from moe_engine.default_model import DEFAULT_PROMPT, default_model_path

        model_path = default_model_path()
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    else:
        model_path = args.model
        prompt = args.prompt if args.prompt is not None else "Once upon a time"
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if args.ep is not None or args.plan is not None:
        return _run_expert_parallel(args)
    if not args.temperature >= 0:  # also refuses nan
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty; give some text to continue")
    predictor = None if args.predictor in (None, "none", "") or args.policy == "none" else args.predictor
    torch.manual_seed(args.seed)
    # A local checkpoint's tokenizer and context are checked before the model loads (no half-run on bad input).
    tokenizer = _tokenizer(model_path) if (Path(model_path) / "config.json").is_file() else None
    if tokenizer is not None:
        from transformers import AutoConfig

        _check_context(AutoConfig.from_pretrained(model_path), len(tokenizer(prompt)["input_ids"]), args.max_new_tokens)
    t0 = time.perf_counter()
    model = moe_engine.from_pretrained(
        model_path,
        budget=parse_budget(args.budget),
        policy=args.policy,
        device=args.device,
        dtype=args.dtype,
        predictor=predictor,
        prefetch_distance=args.prefetch_distance,
        page_cache=args.page_cache,
        prefill_policy=args.prefill_policy,
        preload=args.preload,
        progress=True,
        threads=args.threads,
        quality=args.quality,
        guardrail=args.guardrail,
        guardrail_every=args.guardrail_every,
    )
    load_s = time.perf_counter() - t0
    if tokenizer is None:  # a Hub ID, now in the local cache
        tokenizer = _tokenizer(model_path)
    enc = tokenizer(prompt, return_tensors="pt").to(model.engine.device)
    try:
        _check_context(model.config, enc["input_ids"].shape[1], args.max_new_tokens)
    except ValueError:
        model.close()
        raise
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    if args.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=args.temperature)
    else:
        gen_kwargs.update(do_sample=False)
    model.engine.reset_stats()
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **gen_kwargs)
    dt = time.perf_counter() - t1
    n_new = int(out.shape[1] - enc["input_ids"].shape[1])
    s = model.engine.stats()
    peak = _peak_rss_bytes()
    extra = ""
    if model.engine.device.type == "cuda":
        extra = f", peak GPU {format_bytes(torch.cuda.max_memory_allocated())}"
    if args.policy == "none":
        cache = f"no cache (load on demand), {s.misses} expert loads"
    else:
        slots = f"{s.num_slots} slot{'s' if s.num_slots != 1 else ''}"
        if model.engine.cache.sized:  # copies of several sizes share the byte budget
            slots = f"peak {format_bytes(s.peak_resident_bytes)} resident"
        late = f", {s.late_hits} late" if s.late_hits else ""
        cache = f"hit rate {s.hit_rate:.1%}{late} | budget {format_bytes(s.budget_bytes)} ({slots})"
    if args.quality != "lossless":
        cache += f" | quality {args.quality}: {s.reduced_loads} reduced loads"
        if args.guardrail is not None:
            cache += (f", guardrail {s.guardrail_checks} checks, max KL {s.guardrail_max_kl:.3g}, "
                      f"{s.guardrail_fallbacks} layers back to full precision")
    sys.stdout.flush()  # the streamed text first, then the stats line on stderr (apart from the text)
    print(
        f"\n[moe-engine] {n_new} tokens in {dt:.2f} s ({n_new / dt:.2f} tok/s, load {load_s:.1f} s) | {cache} | "
        f"moved {format_bytes(s.bytes_moved)} | peak RSS {format_bytes(peak)}{extra}",
        file=sys.stderr,
    )
    model.engine.close()
    return 0


def _run_expert_parallel(args: argparse.Namespace) -> int:
    """``--ep N``: N local ranks of ``python -m moe_engine.distributed`` (greedy only)."""
    from moe_engine.distributed.launch import spawn_local

    if args.ep is None or args.ep < 1:
        raise ValueError("--plan needs --ep N (the number of local ranks, equal to the plan's devices)")
    if args.temperature > 0:
        raise ValueError("--ep generates greedily; drop --temperature (every rank must pick the same token)")
    argv = ["--ep-mode", args.ep_mode, "--budget", str(args.budget), "--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (("--model", args.model), ("--prompt", args.prompt), ("--plan", args.plan),
                        ("--device", args.device), ("--dtype", args.dtype), ("--threads", args.threads)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return spawn_local(args.ep, argv)


def _tokenizer(model_path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())  # one line
        raise ValueError(f"no usable tokenizer in {model_path} ({detail}); save one beside the model") from None


def _check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} plus the prompt's {prompt_tokens} tokens exceed the model's "
            f"context of {context} positions; use at most {max(context - prompt_tokens, 0)}"
        )

"""``moe-engine serve``: an OpenAI-compatible HTTP server over an offloaded MoE model, with continuous batching."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "serve a MoE checkpoint over an OpenAI-compatible HTTP API with continuous batching"
DESCRIPTION = """\
Serve a Hugging Face MoE checkpoint, routed experts offloaded under --budget, over the OpenAI API:
POST /v1/completions and /v1/chat/completions (streaming over server-sent events or not), GET
/v1/models, /health and /metrics (Prometheus text). One engine thread owns the model: each step it
decodes one token for a batch of running requests and prefills new prompts in chunks; requests join
and leave at step boundaries. The expert-aware scheduler groups requests whose tokens need the same
experts into the same step (bounded waiting); --schedule fcfs is first come, first served.

With no --model it serves the embedded default model (a small Qwen3-MoE) as "moe-engine-default" at
25 % of its expert bytes. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in
flight and exits.

examples:
  moe-engine serve
  moe-engine serve --model ./Mixtral-8x7B --budget 12GiB --port 8080 --max-seqs 16
  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"model": "moe-engine-default", "prompt": "And the king said", "max_tokens": 32}'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or Hub ID (default: the embedded default model)")
    p.add_argument(
        "--budget", default="0.25",
        help="fast-tier bytes for experts: bytes, a size like 512MB / 2GiB, or a fraction like 0.25 (default 0.25)",
    )  # fmt: skip
    p.add_argument("--policy", default="auto", help="eviction policy: auto, lru, lfu, ... or none (default auto)")
    p.add_argument("--predictor", default="cross_layer_gate",
                   help="prefetch predictor, or 'none' to load experts only on demand (default cross_layer_gate)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the folder name; moe-engine-default for the default model)")  # fmt: skip
    p.add_argument("--max-seqs", type=int, default=32, help="requests generating at once; more wait in a queue (default 32)")
    p.add_argument("--max-queue", type=int, default=512, help="requests waiting beyond --max-seqs before 429s (default 512)")
    p.add_argument("--step-seqs", type=int, default=None,
                   help="at most this many requests decode in one step (default: --max-seqs)")  # fmt: skip
    p.add_argument("--schedule", default="expert_aware", choices=["expert_aware", "fcfs"],
                   help="which requests share a decode step (default expert_aware)")  # fmt: skip
    p.add_argument("--max-wait", type=int, default=2,
                   help="expert_aware: tokens a request may fall behind its round-robin share (default 2)")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per prefill forward (default 128)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the model's context minus one)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens a request may ask for (default 256)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may run before it ends (default 600)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument("--allowed-origins", default="*",
                   help="comma-separated web origins whose pages may call the API from a browser (CORS), "
                        "e.g. http://localhost:3000; '*' any (default), '' none")


def run(args: argparse.Namespace) -> int:
    for name in ("max_seqs", "prefill_chunk", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_wait < 0:
        raise ValueError(f"--max-wait must be >= 0, got {args.max_wait}")
    if args.step_seqs is not None and args.step_seqs < 1:
        raise ValueError(f"--step-seqs must be at least 1, got {args.step_seqs}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    from moe_engine.serve.server import serve

    return serve(
        args.model, host=args.host, port=args.port, log_level=args.log_level, budget=args.budget,
        policy=args.policy, predictor=args.predictor, device=args.device, dtype=args.dtype, threads=args.threads,
        served_model_name=args.served_model_name, max_seqs=args.max_seqs, max_queue=args.max_queue,
        step_seqs=args.step_seqs, prefill_chunk=args.prefill_chunk, schedule=args.schedule,
        max_wait=args.max_wait, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        timeout=args.timeout, allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
    )  # fmt: skip

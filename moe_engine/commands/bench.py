"""``moe-engine bench``: measure the engine against offloading baselines (the machinery: ``moe_engine.bench``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "bench"
HELP = "benchmark the engine at several budgets against accelerate offloading and load-on-demand"
DESCRIPTION = """\
Measure decode and prefill speed, peak memory and bytes read from disk for the engine at several
expert budgets and for the baselines, in one run on the same prompt (batch 1, a fixed prompt of token
ids, greedy decoding). Each system runs in its own subprocess, with the model's files dropped from the
OS page cache first, so every run starts cold and reads its experts from disk.

Systems (--systems):
  lru         the engine, LRU expert cache, no prediction; swept over --budgets
  default     the engine as it ships: from_pretrained's default policy and cross-layer-gate prefetch
  prefetch    the engine, LRU cache + the cross-layer-gate predictor prefetching the next layer's experts
  ondemand    the engine with no cache (policy "none"): every expert is read when it is needed
  int8, int4  the engine as it ships on a copy of the checkpoint with every expert quantized
              (int8 per channel; int4 group 64), made once with moe_engine.quant under
              ~/.cache/moe-engine/bench/quantized; lossy (see `moe-engine quantize` for the quality
              cost). The budget stays a fraction of the stored expert bytes: the same memory cap
  fast        the engine on a copy holding each expert at its stored precision plus an int4-g64 copy,
              from_pretrained(quality="fast"): every miss loads the int4 copy (lossy, per-miss choice)
  accelerate  Hugging Face accelerate offloading, what a user would try first:
              from_pretrained(device_map="auto", max_memory={"cpu": M}, offload_folder=...),
              M = non-expert bytes + budget x expert bytes (the same memory the engine gets).
              Its offloaded weights are read through the OS page cache, which max_memory does not
              bound; under --memory-cap cgroup the page cache is charged to the same cap as the engine
  accelerate_plain  the same, never under the kernel memory cap: accelerate on a machine with free
              RAM (its page cache keeps the offloaded weights; see the pcache column). A reference
  accelerate_cold  the same as accelerate, with the page cache of the model's and offload folder's
              files dropped before every forward pass: accelerate where RAM really is M
  A name alone runs at --ref-budget (lru: at every --budgets); NAME@F runs at budget F.

Memory cap (--memory-cap): with "cgroup" every run but accelerate_plain runs in a fresh memory cgroup
(cgroup v1 or v2; needs root) whose limit is the same for every system at a budget:
non-expert bytes + budget x expert bytes + a runtime allowance, measured once per benchmark as the
peak memory of a child that imports torch, transformers, accelerate and moe_engine and runs a tiny
model. The kernel charges page cache to the cgroup too, reclaims it at the limit and OOM-kills past
it; a run killed so is reported as "oom_killed". The JSON records per run the cap, whether it was
enforced, the cgroup's peak charge (whole run and generation), OOM kills and limit hits.

Writes BENCH.json (settings, every figure, ratios against accelerate, the acceptance checks) and
BENCH.png (decode tok/s and peak memory against budget; only with matplotlib installed, the "bench"
extra, else skipped with a note) into --out, with BENCH = bench_<model>, and prints a table. --out
defaults to ~/.cache/moe-engine/bench, outside the source tree, so a run never overwrites the
committed benchmarks/results/ (pass --out benchmarks/results to update those on purpose).

Examples:
  moe-engine bench --large                       # the generated 2 GB checkpoint, all systems
  moe-engine bench --model ./my-moe --budgets 0.25,0.5 --systems lru,accelerate
"""


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.125,0.25, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions of expert bytes in (0, 1], got {text!r}")
    return values


def _fraction(text: str) -> float:
    (value,) = _fractions(text)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moe_engine.bench.checkpoint import DEFAULT_LARGE_DIR
    from moe_engine.bench.report import DEFAULT_RESULTS_DIR

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH",
                       help="checkpoint folder to benchmark (default: the project's default model; if it is "
                            "not available, the generated large checkpoint as with --large)")
    which.add_argument("--large", action="store_true",
                       help="benchmark the generated Mixtral-layout checkpoint whose experts total 2.2 GB "
                            "in bf16 (8 layers x 16 experts, hidden 1024, FFN 2816); generated with a "
                            "fixed seed on first use and cached in --large-dir")
    parser.add_argument("--large-dir", default=str(DEFAULT_LARGE_DIR), metavar="DIR",
                        help="where the large checkpoint is cached (default: %(default)s)")
    parser.add_argument("--budgets", type=_fractions, default=(0.125, 0.25, 0.5, 1.0), metavar="F,F,...",
                        help="expert budgets, as fractions of all expert bytes, that 'lru' is swept over "
                             "(default: 0.125,0.25,0.5,1.0)")
    parser.add_argument("--ref-budget", type=_fraction, default=0.25, metavar="F",
                        help="budget for systems named without @F (all but lru); the "
                             "acceptance checks compare systems at it (default: %(default)s)")
    parser.add_argument("--systems", default="lru,prefetch,default,ondemand,accelerate,accelerate_plain,accelerate_cold",
                        metavar="LIST",
                        help="comma-separated systems to run, each NAME or NAME@F (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=32, metavar="N",
                        help="tokens decoded greedily after the prompt (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, metavar="N",
                        help="length of the fixed prompt, in token ids drawn with --seed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt's token ids (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="wall-clock limit of each system run; a run past it is killed and reported "
                             "as timed out, with the tokens it had decoded (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads in every run (default: torch's default, one per core)")
    parser.add_argument("--memory-cap", choices=("none", "cgroup"), default=None,
                        help="kernel-enforced memory cap for each run: 'cgroup' (a fresh memory cgroup per "
                             "run, the same limit for every system at a budget, page cache included) or "
                             "'none' (default: cgroup when this machine allows it, else none with a note)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="rounds over all systems, interleaved (A B C, A B C, ...); each system is "
                             "reported by its median-speed run, every round's speeds are kept in the JSON "
                             "(default: %(default)s)")
    parser.add_argument("--ep", type=int, default=None, metavar="N",
                        help="instead of the systems: expert parallelism on N local gloo ranks "
                             "(python -m moe_engine.distributed.evaluate): bytes on the wire, all-to-all calls "
                             "and cross-rank tokens per token, comm vs compute time per rank, standard vs "
                             "coherent mode, with and without regrouping, next to single-process")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="with --ep: a moe-placement/1 plan for N devices (round-robin always runs)")
    parser.add_argument("--ep-text", default=None, metavar="FILE",
                        help="with --ep: UTF-8 text to run (default: text decoded from the fixed prompt ids)")
    parser.add_argument("--ep-tokens", type=int, default=1024, metavar="N",
                        help="with --ep: tokens of the text to run (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS_DIR), metavar="DIR",
                        help="folder for bench_<model>.json and (with matplotlib) .png (default: %(default)s, outside the "
                             "source tree so the committed benchmarks/results/ is never overwritten; pass "
                             "--out benchmarks/results to update those)")


def _resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint to benchmark and its short name for the output files."""
    from moe_engine.cli import UserError

    if args.model:
        path = Path(args.model).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"--model {args.model}: no config.json there; pass a Hugging Face checkpoint folder")
        return path, path.resolve().name
    if not args.large:
        try:
            import moe_engine

            path = Path(moe_engine.default_model_path())
            if not (path / "config.json").is_file():
                raise FileNotFoundError(path)
            return path, "default"
        except (ImportError, AttributeError, FileNotFoundError, OSError) as exc:
            print(f"note: the project's default model is not available ({type(exc).__name__}: {exc}); "
                  "benchmarking the generated large checkpoint instead (as with --large)", file=sys.stderr)
    from moe_engine.bench.checkpoint import CheckpointSpec, ensure_checkpoint

    path = ensure_checkpoint(args.large_dir, CheckpointSpec())
    return path, "mixtral-2g"


def run(args: argparse.Namespace) -> int:
    from moe_engine.bench.report import format_table, write_report
    from moe_engine.bench.runner import run_benchmark
    from moe_engine.bench.settings import BenchSettings, parse_systems
    from moe_engine.cli import UserError

    if args.decode_tokens < 1 or args.prompt_tokens < 1:
        raise UserError("--decode-tokens and --prompt-tokens must be at least 1")
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    try:
        runs = parse_systems(args.systems, args.budgets, args.ref_budget)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    memory_cap = args.memory_cap
    if memory_cap != "none":
        from moe_engine.bench.memory_cap import detect_backend

        backend, why = detect_backend()
        if backend is None and memory_cap == "cgroup":
            raise UserError(f"--memory-cap cgroup: not available here ({why}); use --memory-cap none")
        if backend is None:
            print(f"note: no kernel memory cap ({why}); running with --memory-cap none, so accelerate's "
                  "page cache is not bounded", file=sys.stderr)
        memory_cap = "cgroup" if backend is not None else "none"
    path, name = _resolve_model(args)
    if args.ep is not None or args.plan is not None or args.ep_text is not None:
        return _run_ep(args, path, name)
    settings = BenchSettings(
        model_path=str(path), model_name=name, systems=tuple(r.label for r in runs), ref_budget=args.ref_budget,
        prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, seed=args.seed,
        timeout_s=args.timeout, threads=args.threads, memory_cap=memory_cap, repeats=args.repeats,
    )
    try:
        report = run_benchmark(settings)
    except RuntimeError as exc:
        if "memory cap" not in str(exc) and "runtime allowance" not in str(exc):
            raise
        raise UserError(str(exc)) from None
    json_path, png_path = write_report(report, args.out)
    print(format_table(report))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path is not None else ""))
    return 0


def _run_ep(args: argparse.Namespace, path: Path, name: str) -> int:
    """``--ep N``: the expert-parallel measurement (``moe_engine.distributed.evaluate``), one table."""
    import json
    import tempfile

    from moe_engine.cli import UserError

    if args.ep is None or args.ep < 2:
        raise UserError("--ep N needs N >= 2 ranks (--plan and --ep-text go with --ep)")
    if args.ep_tokens < 1:
        raise UserError("--ep-tokens must be at least 1")
    if args.ep_text is not None and not Path(args.ep_text).is_file():
        raise UserError(f"--ep-text {args.ep_text}: no such file")
    if args.plan is not None and not Path(args.plan).is_file():
        raise UserError(f"--plan {args.plan}: no such file; make one with `moe-engine plan`")
    from moe_engine.distributed import evaluate

    out_dir = Path(args.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench_ep{args.ep}_{name}.json"
    from transformers import AutoTokenizer

    try:  # every rank tokenizes the text: check once here, before any process starts
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"--ep runs text through the model, but {path} has no usable tokenizer ({exc})") from None
    with tempfile.TemporaryDirectory() as tmp:
        text = args.ep_text
        if text is None:
            from moe_engine.bench.probes import prompt_ids

            ids = (prompt_ids(path, args.prompt_tokens, args.seed) * (args.ep_tokens // args.prompt_tokens + 1))
            text = str(Path(tmp) / "ep.txt")
            Path(text).write_text(tok.decode(ids[: args.ep_tokens]))
        argv = ["--text", text, "--model", str(path), "--ep", str(args.ep), "--max-tokens", str(args.ep_tokens),
                "--out", str(out)]
        if args.plan:
            argv += ["--plan", args.plan]
        evaluate.main(argv)
    report = json.loads(out.read_text())
    print(f"expert parallelism, {report['world_size']} ranks, {report['tokens']} tokens "
          f"(single process: {report['single_process_seconds']:.2f} s)")
    print(f"{'layout':<12} {'mode':<9} {'regroup':>7} {'bytes/tok':>10} {'a2a/tok':>8} {'msgs/tok':>8} "
          f"{'x-rank':>7} {'plan-eval':>9} {'comm s':>7} {'compute s':>9} {'wall s':>7}")
    for r in report["results"]:
        print(f"{r['layout']:<12} {r['mode']:<9} {str(r['regroup']):>7} {r['bytes_per_token']:>10.0f} "
              f"{r['a2a_calls_per_token']:>8.4f} {r['messages_per_token']:>8.3f} {r['cross_device_share']:>7.3f} "
              f"{r['plan_eval_cross_device_share']:>9.3f} {r['comm_seconds_max']:>7.2f} {r['compute_seconds_max']:>9.2f} "
              f"{r['seconds']:>7.2f}")
    print(f"\nwrote {out}")
    return 0

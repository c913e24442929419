"""``moe-engine eval-predictors``: recall@k and precision@k of expert predictors on a held-out trace."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "eval-predictors"
HELP = "score expert predictors (recall@k, precision@k per layer and distance) on a held-out routing trace"
DESCRIPTION = """\
Fit the predictors on the --train traces, then score each on the --test trace: for every token, source
MoE layer l and distance d, the predictor's top-k experts of layer l+d (knowing the token's experts at
layers 0..l, its gate input at layer l when the trace has gate inputs, and the earlier tokens of its
sequence) against the experts the router chose. Reports recall@k (hits / top_k) and precision@k
(hits / k), averaged over tokens and then over layer pairs, and per layer pair.

Predictors: popularity, transition (first order), transition_ho (higher order), mlp_history (learned,
expert ids only), oracle (reads the test trace: the upper bound), and with gate inputs in the traces
mlp_gate, plus cross_layer_gate when --model gives the checkpoint whose routers to apply.

examples:
  moe-engine eval-predictors --train law.npz summary.npz translation.npz --test intent.npz
  moe-engine eval-predictors --train train.npz --test val.npz --model ckpt/ --json
  moe-engine eval-predictors --train a.npz --test b.npz --predictors transition,oracle --distances 1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", nargs="+", default=[], help="routing traces (.npz) to fit predictors on")
    p.add_argument("--test", required=True, help="routing trace (.npz) to score the predictors on")
    p.add_argument(
        "--predictors",
        default=None,
        help="comma-separated predictor names (default: every predictor the traces and --model allow)",
    )
    p.add_argument("--distances", default="1,2,3", help="comma-separated distances d (default 1,2,3)")
    p.add_argument("--k", type=int, default=None, help="experts predicted per token (default: the trace's top-k)")
    p.add_argument("--model", default=None, help="checkpoint directory for cross_layer_gate's router weights")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the learned predictors (default 3)")
    p.add_argument(
        "--learned-dir",
        default=None,
        help="directory to save learned predictors to (NAME.pt), or load them from when already there",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _default_predictors(train, test, model: str | None) -> list[str]:
    from moe_engine.offline.predictor_factory import HISTORY_PREDICTORS

    names = list(HISTORY_PREDICTORS)
    if train and test.gate_inputs is not None and all(t.gate_inputs is not None for t in train):
        names.append("mlp_gate")
    if model is not None and test.gate_inputs is not None:
        names.append("cross_layer_gate")
    return names + ["oracle"]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_engine.cli import UserError
    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.traces import load_trace
    from moe_engine.predictors.evaluate import evaluate_predictor

    test = load_trace(args.test)
    train = [load_trace(p) for p in args.train]
    for p, t in zip(args.train, train):
        if t.expert_ids.shape[1:] != test.expert_ids.shape[1:]:
            raise UserError(f"{p} has [L, K] = {t.expert_ids.shape[1:]}, the test trace {test.expert_ids.shape[1:]}")
    try:
        distances = tuple(int(x) for x in args.distances.split(","))
    except ValueError:
        raise UserError(f"--distances must be comma-separated integers, got {args.distances!r}") from None
    if not distances or min(distances) < 1 or max(distances) >= test.num_layers:
        raise UserError(f"distances must be in 1..{test.num_layers - 1}, got {args.distances}")
    if args.k is not None and not 1 <= args.k <= test.num_experts:
        raise UserError(f"--k must be in 1..{test.num_experts}")
    names = args.predictors.split(",") if args.predictors else _default_predictors(train, test, args.model)
    learned_dir = Path(args.learned_dir) if args.learned_dir else None
    if learned_dir is not None:
        learned_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = []
    for name in names:
        pred = build_predictor(
            name,
            train,
            test,
            model_dir=args.model,
            learned_path=learned_dir / f"{name}.pt" if learned_dir is not None else None,
            log=log,
            epochs=args.epochs,
            distances=distances,
        )
        results.extend(evaluate_predictor(pred, test, distances, args.k, name=name))
        log(f"{name}: scored")
    if args.json:
        print(json.dumps({
            "train": args.train,
            "test": args.test,
            "k": args.k or test.top_k,
            "results": [r.to_dict() for r in results],
        }, indent=1))
        return 0
    print(f"recall@k / precision@k on {args.test} ({test.num_tokens} tokens), k = {args.k or test.top_k}")
    print(f"{'predictor':<18} {'inputs':<11} {'d':>2} {'recall':>7} {'precision':>9}  recall per layer pair")
    for r in results:
        per = " ".join(f"{s.recall:.2f}" for s in r.per_layer)
        print(f"{r.predictor:<18} {r.inputs:<11} {r.distance:>2} {r.recall:>7.4f} {r.precision:>9.4f}  {per}")
    return 0

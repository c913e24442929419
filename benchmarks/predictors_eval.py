"""Expert predictors on real routing: leave-one-domain-out on the shared traces, and the default model.

Part 1 (``../shared/traces``, DeepSeek-V2-Lite routing, four domains): for each domain in turn, fit every
history predictor on the other three and score it on the held-out one (recall@6 and precision@6 at
distances 1, 2, 3, per layer pair). The learned predictor trains on two of the three training domains
and calibrates on the third (see ``predictors/learned.py``); its order is the sorted domain names.

Part 2 (default model): the cross-layer gate (the model's own routers) and the learned gate-input
predictor, trained on a trace of the model's training text and scored on a trace of its held-out
validation documents, both recorded here with ``moe-engine trace --gate-inputs``.

Writes ``benchmarks/results/predictors_eval.json``; every figure comes from this run. Learned models are
saved under ``.cache/predictors/`` (reused by ``cache_policies_eval.py``; ``--reuse`` loads them instead
of training).

Usage::

    python -m moe_engine.benchmarks.predictors_eval                       # both parts, about an hour on 2 busy cores
    python -m moe_engine.benchmarks.predictors_eval --skip-default-model
    python -m moe_engine.benchmarks.predictors_eval --skip-lodo
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "traces"
DOMAINS = ("intent", "law", "summary", "translation")
HISTORY = ("popularity", "transition", "transition_ho", "mlp_history")
DISTANCES = (1, 2, 3)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lodo(args: argparse.Namespace) -> dict[str, Any]:
    from moe_engine.predictors.evaluate import evaluate_predictor

    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.traces import load_trace

    traces = {d: load_trace(Path(args.traces) / f"dsv2lite-esft-{d}.npz") for d in DOMAINS}
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    folds: dict[str, Any] = {}
    for test in DOMAINS:
        train_names = [d for d in DOMAINS if d != test]
        train = [traces[d] for d in train_names]
        rows = []
        for name in (*HISTORY, "oracle"):
            t0 = time.perf_counter()
            path = models / f"{name}-dsv2-lodo-{test}.pt"
            if name.startswith("mlp") and path.exists() and not args.reuse:
                path.unlink()
            pred = build_predictor(
                name, train, traces[test], learned_path=path if name.startswith("mlp") else None, log=log,
                epochs=args.epochs, threads=1,
            )
            fit_s = time.perf_counter() - t0
            res = evaluate_predictor(pred, traces[test], DISTANCES, name=name)
            for r in res:
                rows.append({**r.to_dict(), "fit_seconds": fit_s})
            log(f"[lodo {test}] {name}: " + ", ".join(f"d={r.distance} recall {r.recall:.4f}" for r in res)
                + f" (fit {fit_s:.0f} s)")
            if hasattr(pred, "train_history"):
                rows[-1]["train_history"] = pred.train_history
        folds[test] = {"train": train_names, "results": rows}
    # Summary: recall per predictor, distance, domain, and the average over domains.
    summary: dict[str, Any] = {}
    for name in (*HISTORY, "oracle"):
        for d in DISTANCES:
            per = {t: next(r["recall"] for r in folds[t]["results"] if r["predictor"] == name and r["distance"] == d)
                   for t in DOMAINS}
            summary.setdefault(name, {})[f"d{d}"] = {**per, "average": float(np.mean(list(per.values())))}
    best = max(HISTORY, key=lambda n: summary[n]["d1"]["average"])
    return {
        "protocol": "leave-one-domain-out over the four shared DeepSeek-V2-Lite traces; recall@6 / precision@6 "
                    "averaged over tokens, then over the 25 (L - d) layer pairs; history predictors only see "
                    "expert ids (the token's path and earlier tokens of its sequence)",
        "folds": folds,
        "recall_summary": summary,
        "acceptance": {
            "best_history_predictor": best,
            "next_layer_recall_at_6_average": summary[best]["d1"]["average"],
            "per_domain": {t: summary[best]["d1"][t] for t in DOMAINS},
            "bar": 0.57,
            "met": summary[best]["d1"]["average"] >= 0.57,
            "reference_plain_mlp_last3_layers": {"average": 0.535, "intent": 0.61, "law": 0.55, "summary": 0.53,
                                                 "translation": 0.44, "source": "issue 4 (not rerun here)"},
        },
    }


def record_trace(out: Path, split: str, docs: int | None, chars: int) -> Path:
    """A gate-input trace of the default model on the first ``chars`` characters of ``docs`` documents
    of the training (shuffled with a fixed seed) or validation split (all of them when ``docs`` is
    None), recorded with ``moe-engine trace``."""
    import random

    from moe_engine.benchmarks.train_default_model import fetch_corpus, load_documents, split_documents

    train_docs, val_docs = split_documents(load_documents(fetch_corpus(REPO / ".cache" / "corpus")))
    chosen = train_docs if split == "training" else val_docs
    if split == "training":
        random.Random(0).shuffle(chosen)
    chosen = chosen[:docs] if docs is not None else chosen
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.with_suffix(".txt")
    text.write_text("\n".join(d["text"][:chars] for d in chosen))
    seed = " (seed 0)" if split == "training" else ""
    cmd = [sys.executable, "-m", "moe_engine", "trace", "--text", str(text), "--gate-inputs", "--out", str(out),
           "--dataset", f"default-model {split} split: first {chars} chars of {len(chosen)} documents{seed}"]
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def default_model(args: argparse.Namespace) -> dict[str, Any]:
    from moe_engine.predictors.evaluate import evaluate_predictor

    from moe_engine.default_model import default_model_path
    from moe_engine.offline.predictor_factory import build_predictor
    from moe_engine.offline.traces import load_trace

    val_path = Path(args.val_trace)
    if not val_path.exists():
        record_trace(val_path, "validation", None, args.val_chars)
    val = load_trace(val_path)
    if val.gate_inputs is None:
        raise SystemExit(f"{val_path} has no gate inputs: record it with `moe-engine trace --gate-inputs`")
    train_path = Path(args.models) / "default-train.npz"
    if not (args.reuse and train_path.exists()):
        record_trace(train_path, "training", args.train_docs, args.train_chars)
    train = load_trace(train_path)
    rows = []
    for name in ("cross_layer_gate", "mlp_gate", "mlp_history", "transition_ho"):
        t0 = time.perf_counter()
        path = Path(args.models) / f"{name}-default.pt"
        if name.startswith("mlp") and path.exists() and not args.reuse:
            path.unlink()
        pred = build_predictor(
            name, [train], val, model_dir=default_model_path(), learned_path=path if name.startswith("mlp") else None,
            log=log, epochs=args.default_epochs, threads=1,
        )
        fit_s = time.perf_counter() - t0
        for r in evaluate_predictor(pred, val, DISTANCES, name=name):
            rows.append({**r.to_dict(), "fit_seconds": fit_s})
            log(f"[default] {name} d={r.distance}: recall {r.recall:.4f}, per pair "
                + " ".join(f"{s.recall:.2f}" for s in r.per_layer))

    def pick(name: str, d: int = 1) -> dict[str, Any]:
        return next(r for r in rows if r["predictor"] == name and r["distance"] == d)

    clg = pick("cross_layer_gate")
    gate_best = max(("cross_layer_gate", "mlp_gate"), key=lambda n: pick(n)["recall"])
    best = pick(gate_best)
    best_min = min(s["recall"] for s in best["per_layer"])
    return {
        "val_trace": str(val_path),
        "val_tokens": val.num_tokens,
        "train_trace": {"path": str(train_path), "tokens": train.num_tokens, "dataset": train.meta.get("dataset")},
        "model": str(default_model_path()),
        "results": rows,
        "acceptance": {
            "cross_layer_gate_d1_average": clg["recall"],
            "cross_layer_gate_d1_per_pair": [s["recall"] for s in clg["per_layer"]],
            "cross_layer_gate_bar": 0.85,
            "cross_layer_gate_met": clg["recall"] >= 0.85,
            "best_gate_input_predictor": gate_best,
            "best_gate_input_d1_average": best["recall"],
            "best_gate_input_d1_min_pair": best_min,
            "best_gate_input_bar": {"average": 0.90, "min_pair": 0.75},
            "best_gate_input_met": best["recall"] >= 0.90 and best_min >= 0.75,
            "d2_d3": {n: {f"d{d}": pick(n, d)["recall"] for d in (2, 3)} for n in ("cross_layer_gate", "mlp_gate")},
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=str(SHARED), help="folder of the shared dsv2lite-esft-*.npz traces")
    p.add_argument("--val-trace", default=str(REPO / ".cache" / "predictors" / "default-val.npz"),
                   help="default-model validation trace with gate inputs; recorded from the held-out "
                        "documents (first --val-chars characters of each) when missing")
    p.add_argument("--val-chars", type=int, default=8000, help="characters taken from each validation document")
    p.add_argument("--models", default=str(REPO / ".cache" / "predictors"), help="where learned models are saved")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the learned history predictor (part 1)")
    p.add_argument("--default-epochs", type=int, default=4, help="epochs of the learned predictors (part 2)")
    p.add_argument("--train-docs", type=int, default=40, help="training documents in the part-2 training trace")
    p.add_argument("--train-chars", type=int, default=7000, help="characters taken from each of them")
    p.add_argument("--reuse", action="store_true", help="load saved learned models and traces instead of redoing them")
    p.add_argument("--skip-lodo", action="store_true", help="skip part 1")
    p.add_argument("--skip-default-model", action="store_true", help="skip part 2")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predictors_eval.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # small models on a shared 2-core machine: threads cost more than they give
    out_path = Path(args.out)
    report: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    report["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "platform": platform.platform(), "cpus": __import__("os").cpu_count()}
    report["command"] = "python -m moe_engine.benchmarks.predictors_eval " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if not args.skip_lodo:
        report["shared_traces_lodo"] = lodo(args)
    if not args.skip_default_model:
        report["default_model"] = default_model(args)
    report["wall_seconds"] = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    log(f"wrote {out_path}")
    for part in ("shared_traces_lodo", "default_model"):
        if part in report:
            print(part, json.dumps(report[part]["acceptance"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

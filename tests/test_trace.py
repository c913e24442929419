"""Routing-trace recording: the recorder agrees with stock transformers' router logits, files round-trip,
and ``moe-engine trace`` works on tiny models and on the embedded default model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
import torch
from transformers import AutoModelForCausalLM

from moe_engine.cli import main
from moe_engine.offline.trace_recorder import record_trace, split_into_sequences
from moe_engine.offline.traces import load_trace

SOFTMAX_VARIANTS = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_step2", "olmoe"]


def _stock_router_logits(model, ids: torch.Tensor):
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    logits = getattr(out, "router_logits", None)
    if not logits:
        pytest.skip(f"{type(model).__name__} does not return router logits")
    return [lg.reshape(ids.shape[0], ids.shape[1], -1).float() for lg in logits]


def _sequences(n_seq: int = 3, length: int = 11, short: int = 5, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, tiny_models.VOCAB_SIZE, (length,), generator=g).tolist() for _ in range(n_seq)]
    seqs.insert(1, torch.randint(4, tiny_models.VOCAB_SIZE, (short,), generator=g).tolist())  # a shorter one
    return seqs


@pytest.mark.parametrize("variant", SOFTMAX_VARIANTS)
def test_expert_ids_are_topk_of_stock_router_logits(tiny_checkpoint, variant):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(variant), dtype=torch.float32).eval()
    seqs = _sequences()
    trace = record_trace(model, seqs, gate_inputs=True, batch_size=2)
    k = model.config.num_experts_per_tok
    assert trace.num_sequences == len(seqs)
    assert trace.num_tokens == sum(len(s) for s in seqs)
    assert trace.top_k == k
    assert trace.expert_ids.dtype == np.uint8 and trace.expert_weights.dtype == np.float16
    assert trace.gate_inputs is not None and trace.gate_inputs.dtype == np.float16
    assert trace.gate_inputs.shape == (trace.num_tokens, trace.num_layers, model.config.hidden_size)
    assert trace.meta["moe_layers"] == tiny_models.moe_layer_indices(model.config)
    for s, seq in enumerate(seqs):
        rows = slice(trace.sequence_starts[s], trace.sequence_starts[s + 1])
        stock = _stock_router_logits(model, torch.tensor([seq]))
        assert len(stock) == trace.num_layers
        for layer, lg in enumerate(stock):
            probs = torch.softmax(lg[0], dim=-1)
            top = probs.topk(k, dim=-1)
            np.testing.assert_array_equal(trace.expert_ids[rows, layer], top.indices.numpy())
            np.testing.assert_allclose(
                trace.expert_weights[rows, layer].astype(np.float32), top.values.numpy(), rtol=2e-3, atol=1e-4
            )
            # weights are ordered highest first and are unnormalised probabilities
            assert np.all(np.diff(trace.expert_weights[rows, layer].astype(np.float32), axis=1) <= 0)


def test_gate_inputs_are_the_router_input(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3_moe"), dtype=torch.float32).eval()
    seq = _sequences(n_seq=1, short=3)[0]
    trace = record_trace(model, [seq], gate_inputs=True)
    # The router input is the post-attention RMSNorm output of each MoE decoder layer.
    seen = {}
    layers = model.model.layers
    hooks = [
        layers[i].post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o.detach())
        )
        for i in trace.meta["moe_layers"]
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]), use_cache=False)
    for h in hooks:
        h.remove()
    for j, i in enumerate(trace.meta["moe_layers"]):
        np.testing.assert_allclose(
            trace.gate_inputs[:, j].astype(np.float32), seen[i][0].numpy(), rtol=1e-2, atol=1e-3
        )


def test_sigmoid_router_weights_are_sigmoid_scores(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("deepseek_v3"), dtype=torch.float32).eval()
    seq = _sequences(n_seq=1)[0]
    trace = record_trace(model, [seq])
    captured = []
    handles = [
        blk.mlp.gate.register_forward_hook(lambda m, a, o: captured.append(o))
        for blk in model.model.layers
        if hasattr(blk.mlp, "gate")
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]), use_cache=False)
    for h in handles:
        h.remove()
    assert trace.meta["router_score"] == "sigmoid"
    for layer, (logits, _, idx) in enumerate(captured):
        assert set(map(tuple, np.sort(trace.expert_ids[:, layer], axis=1))) == set(
            map(tuple, np.sort(idx.numpy(), axis=1))
        )
        want = torch.sigmoid(logits.float()).gather(
            1, torch.from_numpy(trace.expert_ids[:, layer].astype(np.int64))
        )
        np.testing.assert_allclose(
            trace.expert_weights[:, layer].astype(np.float32), want.numpy(), rtol=2e-3, atol=1e-4
        )


def test_batching_does_not_change_the_trace(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("mixtral"), dtype=torch.float32).eval()
    seqs = _sequences(n_seq=5)
    a = record_trace(model, seqs, batch_size=1)
    b = record_trace(model, seqs, batch_size=4)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.sequence_starts, b.sequence_starts)


def test_split_into_sequences():
    assert split_into_sequences(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_into_sequences([], 3) == []
    with pytest.raises(ValueError):
        split_into_sequences([1], 0)


def test_cli_trace_round_trip(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3_moe", tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(300)))
    out = tmp_path / "t.npz"
    rc = main(
        [
            "trace",
            "--model",
            str(path),
            "--text",
            str(text),
            "--out",
            str(out),
            "--gate-inputs",
            "--seq-len",
            "32",
            "--max-tokens",
            "100",
        ]
    )
    assert rc == 0
    tr = load_trace(out)
    assert tr.num_tokens <= 100 and tr.num_sequences == -(-tr.num_tokens // 32)
    assert tr.gate_inputs is not None and tr.gate_inputs.dtype == np.float16
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["format"] == "moe-routing-trace/1" and meta["top_k"] == 2 and meta["dataset"] == "text.txt"
    # Saved file agrees with recording in process on the same tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"][:100]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    again = record_trace(model, split_into_sequences(ids, 32))
    np.testing.assert_array_equal(tr.expert_ids, again.expert_ids)


def test_cli_trace_bad_input(tmp_path, capsys):
    assert (
        main(["trace", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--out", str(tmp_path / "t.npz")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def _default_model_or_skip():
    try:
        from moe_engine.default_model import default_model_path

        return default_model_path()
    except FileNotFoundError:
        pytest.skip("embedded default model not present")


def test_default_model_trace_matches_stock_router_logits(tmp_path):
    path = _default_model_or_skip()
    out = tmp_path / "d.npz"
    prompt = "And the king said unto his servants, Go ye and search the land of Egypt."
    assert main(["trace", "--prompt", prompt, "--out", str(out), "--gate-inputs"]) == 0
    tr = load_trace(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    assert tr.num_tokens == ids.shape[1] and tr.num_sequences == 1
    k = model.config.num_experts_per_tok
    for layer, lg in enumerate(_stock_router_logits(model, ids)):
        np.testing.assert_array_equal(
            tr.expert_ids[:, layer], torch.softmax(lg[0], -1).topk(k).indices.numpy()
        )
    assert tr.gate_inputs.shape == (ids.shape[1], model.config.num_hidden_layers, model.config.hidden_size)

"""Expert predictors on small synthetic traces: golden recalls, consistency of scores() with
trace_scores(), persistence, and the eval-predictors CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from moe_engine.predictors import PredictionContext, available_predictors, make_predictor, predictor_class
from moe_engine.predictors.evaluate import evaluate_predictor, score_layers, topk_hits
from moe_engine.predictors.learned import GateMLP, HistoryMLP, path_matches, trace_path_matches
from moe_engine.predictors.simple import Popularity
from moe_engine.predictors.transitions import HigherOrderTransitionPredictor, TransitionPredictor

from moe_engine.cli import main
from moe_engine.offline.traces import RoutingTrace

L, E, K = 4, 8, 2


def chain_trace(T: int = 60, seq_len: int = 10, seed: int = 0, gate_width: int = 0) -> RoutingTrace:
    """Deterministic paths: a token's first expert at layer 0 fixes its experts at every layer
    (layer l uses (a + l) % E and (a + l + 3) % E), so transitions predict perfectly."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, E, size=T)
    ids = np.stack([np.stack([(a + layer) % E, (a + layer + 3) % E], -1) for layer in range(L)], 1)
    starts = np.arange(0, T + 1, seq_len)
    gi = None
    if gate_width:
        # Gate input of layer l: one-hot of the token's base expert (enough to know every later layer).
        gi = np.zeros((T, L, gate_width), dtype=np.float16)
        gi[np.arange(T), :, a] = 1.0
    return RoutingTrace(
        expert_ids=ids.astype(np.uint8),
        expert_weights=np.full(ids.shape, 0.5, dtype=np.float16),
        sequence_starts=starts.astype(np.int64),
        meta={"num_experts": E},
        gate_inputs=gi,
    )


def recall(pred, trace, d=1) -> float:
    return evaluate_predictor(pred, trace, (d,))[0].recall


def test_registry_lists_every_predictor():
    names = available_predictors()
    for n in ("cross_layer_gate", "transition", "transition_ho", "mlp_history", "mlp_gate", "popularity", "oracle"):
        assert n in names
    with pytest.raises(ValueError, match="unknown predictor 'nope'; choose one of"):
        make_predictor("nope")
    with pytest.raises(ValueError, match="unknown predictor"):
        predictor_class("nope")


def test_topk_hits_and_layer_scores_golden():
    scores = np.array([[[0.9, 0.8, 0.1, 0.0]], [[0.0, 0.1, 0.7, 0.6]]])  # [T=2, M=1, E=4]
    true = np.array([[[0, 2]], [[2, 3]]])
    assert topk_hits(scores, true, 2).tolist() == [[1], [2]]
    rec, prec = score_layers(scores, true, 2)
    assert rec.tolist() == [0.75] and prec.tolist() == [0.75]
    rec1, prec1 = score_layers(scores, true, 1)
    assert rec1.tolist() == [0.5] and prec1.tolist() == [1.0]


def test_oracle_recall_is_one():
    tr = chain_trace()
    oracle = make_predictor("oracle", expert_ids=tr.expert_ids)
    for res in evaluate_predictor(oracle, tr, (1, 2, 3)):
        assert res.recall == 1.0 and res.precision == 1.0 and res.inputs == "oracle"
        assert all(s.recall == 1.0 for s in res.per_layer)
    ctx = PredictionContext(layer=0, history=torch.as_tensor(tr.expert_ids[:3, :1].astype(np.int64)))
    with pytest.raises(ValueError, match="token_index"):
        oracle.scores(ctx, 1)
    with pytest.raises(ValueError, match="only the trace it was built on"):
        oracle.trace_scores(chain_trace(seed=1), 1)


def test_popularity_scores_the_target_layers_frequencies():
    tr = chain_trace()
    pop = Popularity.fit([tr])
    s = pop.trace_scores(tr, 2)
    assert s.shape == (tr.num_tokens, L - 2, E)
    counts = np.bincount(tr.expert_ids[:, 2].ravel(), minlength=E) / tr.expert_ids[:, 2].size
    np.testing.assert_allclose(s[0, 0], counts, rtol=1e-6)
    assert isinstance(pop.scores(PredictionContext(layer=0, history=torch.zeros(2, 1, K, dtype=torch.long)), 1), torch.Tensor)


@pytest.mark.parametrize("cls", [TransitionPredictor, HigherOrderTransitionPredictor])
def test_transitions_learn_deterministic_paths(cls):
    train, test = chain_trace(seed=0), chain_trace(seed=1)
    pred = cls.fit([train], max_distance=3)
    for d in (1, 2, 3):
        assert recall(pred, test, d) == 1.0
    short = cls.fit([train], max_distance=2)
    with pytest.raises(ValueError, match="fitted for distances 1..2"):
        short.trace_scores(test, 3)


def test_transition_scores_match_trace_scores():
    tr = chain_trace()
    pred = HigherOrderTransitionPredictor.fit([tr], order=2)
    full = pred.trace_scores(tr, 1)
    ids = torch.as_tensor(tr.expert_ids.astype(np.int64))
    one = pred.scores(PredictionContext(layer=2, history=ids[5:6, :3]), 1)
    np.testing.assert_allclose(one[0].numpy(), full[5, 2], rtol=1e-5, atol=1e-6)


def test_cross_layer_gate_applies_the_later_router():
    tr = chain_trace(gate_width=E)
    # Router of layer l scores expert (a + l) and (a + l + 3) highest for a one-hot gate input at a.
    weights = []
    for layer in range(L):
        w = torch.zeros(E, E)
        for a in range(E):
            w[(a + layer) % E, a] = 2.0
            w[(a + layer + 3) % E, a] = 1.0
        weights.append(w)
    gate = make_predictor("cross_layer_gate", router_weights=weights)
    for d in (1, 2, 3):
        assert recall(gate, tr, d) == 1.0
    full = gate.trace_scores(tr, 1)
    ctx = PredictionContext(
        layer=1, history=torch.zeros(1, 2, K, dtype=torch.long), gate_input=torch.as_tensor(tr.gate_inputs[7:8, 1]).float()
    )
    np.testing.assert_allclose(gate.scores(ctx, 1)[0].numpy(), full[7, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="gate_inputs"):
        gate.trace_scores(chain_trace(), 1)
    sig = make_predictor("cross_layer_gate", router_weights=weights, score="sigmoid", biases=[torch.zeros(E)] * L)
    assert recall(sig, tr, 1) == 1.0


def test_path_matches_finds_the_repeated_token():
    # Token 3 repeats token 1's path exactly; token 2 shares one expert per layer.
    ids = torch.tensor(
        [
            [[0, 1], [2, 3]],
            [[4, 5], [6, 7]],
            [[4, 0], [6, 2]],
            [[4, 5], [6, 7]],
        ]
    )
    idx, sim = path_matches(ids[3:], ids[:3], num_experts=8, matches=2)
    assert idx[0, :, 0].tolist() == [1, 1]
    assert sim[0, :, 0].tolist() == [1.0, 1.0]
    assert idx[0, :, 1].tolist() == [2, 2] and sim[0, 1, 1].item() == 0.5
    tidx, tsim = trace_path_matches(ids, np.array([0, 4]), 8, 2, window=16)
    assert tidx[3, :, 0].tolist() == [1, 1]
    assert (tidx[0] == -1).all()  # the first token of a sequence has nothing to match


@pytest.fixture(scope="module")
def learned_pair():
    torch.manual_seed(0)
    train = [chain_trace(T=200, seed=s) for s in (0, 1)]
    return HistoryMLP.fit(train, epochs=4, hidden=32, batch_tokens=16, lr=1e-2, threads=1)


def test_history_mlp_learns_and_scores_consistently(learned_pair, tmp_path):
    pred = learned_pair
    test = chain_trace(T=60, seed=5)
    assert recall(pred, test, 1) >= 0.9
    assert "calibration_recall_d1" in pred.train_history
    full = pred.trace_scores(test, 1)
    ids = torch.as_tensor(test.expert_ids.astype(np.int64))
    t, layer = 25, 1  # sequence 2 starts at 20
    ctx = PredictionContext(layer=layer, history=ids[t : t + 1, : layer + 1], prev_tokens=ids[20:t])
    np.testing.assert_allclose(pred.scores(ctx, 1)[0].numpy(), full[t, layer], rtol=1e-4, atol=1e-4)
    path = tmp_path / "mlp.pt"
    pred.save(path)
    again = make_predictor("mlp_history", path=path)
    np.testing.assert_allclose(again.trace_scores(test, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not 'mlp_gate'"):
        GateMLP.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HistoryMLP.load(tmp_path / "missing.pt")


def test_gate_mlp_needs_gate_inputs():
    with pytest.raises(ValueError, match="gate_inputs"):
        GateMLP.fit([chain_trace()], epochs=1, hidden=8)
    pred = GateMLP.fit([chain_trace(T=100, gate_width=E)], epochs=3, hidden=32, lr=1e-2, batch_tokens=16)
    assert recall(pred, chain_trace(seed=3, gate_width=E), 2) >= 0.9


def test_eval_predictors_cli_json(tmp_path, capsys):
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    chain_trace(seed=0).save(train)
    chain_trace(seed=1).save(test)
    rc = main(["eval-predictors", "--train", str(train), "--test", str(test), "--predictors",
               "transition,oracle", "--distances", "1,2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["predictor"], r["distance"]): r for r in out["results"]}
    assert set(rows) == {("transition", 1), ("transition", 2), ("oracle", 1), ("oracle", 2)}
    r = rows[("transition", 2)]
    assert r["inputs"] == "history" and r["recall"] == 1.0 and r["precision"] == 1.0
    assert len(r["per_layer"]) == L - 2
    rc = main(["eval-predictors", "--train", str(train), "--test", str(test), "--predictors", "transition"])
    assert rc == 0 and "transition" in capsys.readouterr().out
    rc = main(["eval-predictors", "--test", str(test), "--predictors", "transition"])
    assert rc == 2 and "training traces" in capsys.readouterr().err
    rc = main(["eval-predictors", "--train", str(train), "--test", str(test), "--distances", "9"])
    assert rc == 2 and "distances must be in 1..3" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_router_predictor_reads_the_checkpoint_routers(tiny_checkpoint, variant):
    from transformers import AutoModelForCausalLM

    from moe_engine.offline.predictor_factory import router_predictor
    from moe_engine.runtime.adapters import moe_blocks

    path = tiny_checkpoint(variant)
    pred = router_predictor(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    routers = [b.gate for _, b in moe_blocks(model)]
    assert len(pred.router_weights) == len(routers) >= 2
    x = torch.randn(3, routers[0].weight.shape[1])
    logits = x @ routers[1].weight.T
    got = pred.scores(PredictionContext(layer=0, history=torch.zeros(3, 1, 1, dtype=torch.long), gate_input=x), 1)
    if variant == "deepseek_v3":
        want = logits.sigmoid() + routers[1].e_score_correction_bias
    else:
        want = logits.softmax(-1)
    torch.testing.assert_close(got, want)


def test_generic_trace_scores_passes_each_tokens_own_history():
    from moe_engine.predictors.base import Predictor

    class PrevToken(Predictor):
        """Scores the experts the previous token of the sequence used at the target layer."""

        uses_prev_tokens = True
        prev_window = 4
        num_experts = E

        def scores(self, ctx, distance):
            out = torch.zeros(ctx.history.shape[0], E)
            if ctx.prev_tokens is not None and len(ctx.prev_tokens):
                assert len(ctx.prev_tokens) <= self.prev_window
                out[:, ctx.prev_tokens[-1, ctx.layer + distance]] = 1.0
            return out

    tr = chain_trace(T=20, seq_len=10)
    s = PrevToken().trace_scores(tr, 2)
    ids = tr.expert_ids.astype(np.int64)
    assert s.shape == (20, L - 2, E)
    assert s[0].sum() == 0 and s[10].sum() == 0  # first tokens of their sequences
    for t in (1, 5, 19):
        for layer in range(L - 2):
            assert set(np.flatnonzero(s[t, layer])) == set(ids[t - 1, layer + 2])

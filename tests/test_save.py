"""save_pretrained of an offloaded model writes a complete checkpoint (experts included) that stock
transformers loads with identical logits; num_parameters counts the experts; dtype/device changes are
refused with the way to do them, no-op conversions return the model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_models import ARCHITECTURES, VOCAB_SIZE
from transformers import AutoModelForCausalLM

import moe_engine


def _ids() -> torch.Tensor:
    return torch.randint(4, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(11))


def _stock(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _load(path, budget=0.25):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BudgetWarning at tiny budgets
        return moe_engine.from_pretrained(path, budget=budget, device="cpu")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_round_trip_through_stock(arch, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(arch)
    out = tmp_path / "saved"
    with _load(src, budget=0.1) as model:
        model.save_pretrained(out)
    assert (out / "config.json").exists()
    assert not list(tmp_path.glob(".saved.*"))  # no temporary folder left beside it
    ids = _ids()
    with torch.no_grad():
        want = _stock(src)(ids).logits
        got = _stock(out)(ids).logits
    assert torch.equal(got, want), (got - want).abs().max()
    # Same tensor names and shapes as the checkpoint the original was saved in.
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_has_every_stock_key_experts_read_lazily(arch, tiny_checkpoint):
    src = tiny_checkpoint(arch)
    stock = _stock(src)
    want = stock.state_dict()
    with _load(src, budget=0.1) as model:
        sd = model.state_dict()
        assert list(sd) == list(want)  # same keys, same order
        assert len(sd) == len(want) and "model.embed_tokens.weight" in sd and "nope" not in sd
        with pytest.raises(KeyError):
            sd["nope"]
        expert_keys = [k for k in want if ".experts." in k]
        assert expert_keys and all(k in sd for k in expert_keys)
        for key, value in want.items():
            assert torch.equal(sd[key], value), key
        # The experts are fresh tensors: changing one changes neither the engine nor a later read.
        sd[expert_keys[0]].zero_()
        fresh = model.state_dict()[expert_keys[0]]
        assert torch.equal(fresh, want[expert_keys[0]])
        # A stock model with zeroed experts loads it and gives the original logits again.
        other = _stock(src)
        with torch.no_grad():
            for k in expert_keys:
                other.state_dict()[k].zero_()
        other.load_state_dict(model.state_dict())
        ids = _ids()
        with torch.no_grad():
            assert torch.equal(other(ids).logits, stock(ids).logits)
        # torch's recursive form (destination/prefix) stays torch's: non-expert tensors only.
        assert not any(".experts." in k for k in model.state_dict(prefix=""))
    with pytest.raises(moe_engine.ModelClosedError, match="closed"):
        sd[expert_keys[0]]


def test_sharded_save_and_overwrite(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with _load(src) as model:
        model.save_pretrained(out, max_shard_size="40KB")
        params = model.num_parameters()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_parameters"] == params
    assert not (out / "stale.txt").exists()  # the folder was replaced whole
    for s in shards:  # each shard under the limit unless it holds one tensor bigger than it
        with safe_open(s, "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(4 * int(torch.Size(sh).numel()) for sh in sizes)
        assert nbytes <= 40_000 or len(sizes) == 1
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_stock(out)(ids).logits, _stock(src)(ids).logits)


def test_save_pretrained_error_leaves_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "saved"
    with _load(tiny_checkpoint("mixtral")) as model:
        with pytest.raises(ValueError, match="max_shard_size"):
            model.save_pretrained(out, max_shard_size="lots")
        model.engine.store.close()  # reads now fail midway through the experts
        with pytest.raises(RuntimeError, match="store .* is closed"):
            model.save_pretrained(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_num_parameters_counts_experts(arch, tiny_checkpoint):
    src = tiny_checkpoint(arch)
    stock = _stock(src)
    with _load(src) as model:
        assert model.num_parameters() == stock.num_parameters()
        assert model.num_parameters(exclude_embeddings=True) == stock.num_parameters(exclude_embeddings=True)
        assert sum(p.numel() for p in model.parameters()) < stock.num_parameters()


def test_dtype_and_device_changes_are_refused(tiny_checkpoint):
    with _load(tiny_checkpoint("mixtral")) as model:
        for call in (lambda: model.to(torch.float16), model.half, model.bfloat16, lambda: model.to("cpu", torch.bfloat16)):
            with pytest.raises(ValueError, match=r"moe_engine.from_pretrained\(path, dtype=\.\.\., device=\.\.\.\)"):
                call()
        with pytest.raises(ValueError, match="device="):
            model.to("meta")
        assert model.to(torch.float32) is model
        assert model.float() is model and model.cpu() is model and model.to("cpu") is model
        assert model.to(device="cpu", dtype=torch.float32) is model
        assert model.dtype == torch.float32
        with torch.no_grad():
            model(_ids())  # still runs

"""Bad input fails early with an exception whose message names the problem (and the file, path or size)."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch
from conftest import fixed_batch
from tiny_models import SUPPORTED_MODEL_TYPES, expert_bytes, tiny_config

import moe_engine


def load(path, budget=0.5, **kwargs):
    return moe_engine.from_pretrained(path, budget=budget, device="cpu", **{"predictor": None, **kwargs})


def load_and_run(path, **kwargs):
    """Load and run one forward: a corrupt file must fail by then (ideally at load)."""
    model = load(path, **kwargs)
    ids, mask = fixed_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    """``copy(variant, sharded=False) -> Path``: a private copy of a tiny checkpoint to damage."""

    def copy(variant: str = "mixtral", sharded: bool = False):
        dst = tmp_path / f"{variant}-copy"
        shutil.copytree(tiny_checkpoint(variant, sharded=sharded), dst)
        return dst

    return copy


# ----------------------------------------------------------------------------------------------------
# paths and models


def test_missing_path(tmp_path):
    path = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(tmp_path)


def test_directory_without_weights(ckpt_copy):
    path = ckpt_copy("mixtral")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"(?i)safetensors"):
        load(path)


def test_not_a_moe_model(llama_checkpoint):
    with pytest.raises(ValueError, match=r"(?i)not a mixture[- ]of[- ]experts"):
        load(llama_checkpoint)


def test_unsupported_moe_architecture(unsupported_moe_checkpoint):
    with pytest.raises(ValueError) as info:
        load(unsupported_moe_checkpoint)
    msg = str(info.value)
    assert "phimoe" in msg, msg
    missing = [t for t in SUPPORTED_MODEL_TYPES if t not in msg]
    assert not missing, f"supported types {missing} not listed in: {msg}"


# ----------------------------------------------------------------------------------------------------
# budgets


def test_budget_smaller_than_one_expert(tiny_checkpoint):
    one = expert_bytes(tiny_config("mixtral"))
    assert one == 24576  # 24 KiB: the pattern below
    size = r"(24576|24,576|24(\.0+)? ?KiB)"
    with pytest.raises(ValueError, match=size):
        load(tiny_checkpoint("mixtral"), budget=one - 1)
    with pytest.raises(ValueError, match=size):
        load(tiny_checkpoint("mixtral"), budget=0.01)  # a fraction below one expert (1/48)
    load(tiny_checkpoint("mixtral"), budget=one)  # exactly one expert is enough


@pytest.mark.parametrize(
    "budget",
    ["12 parsecs", "-1GiB", 1.5, 0, -5, 0.0, "", "lots", "1.5.2GB", float("nan"), True, [1]],
    ids=repr,
)
def test_bad_budget(tiny_checkpoint, budget):
    with pytest.raises(ValueError, match=r"(?i)budget"):
        load(tiny_checkpoint("mixtral"), budget=budget)


def test_unknown_policy_and_predictor(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"lru"):
        load(tiny_checkpoint("mixtral"), policy="fifo-ish")
    with pytest.raises(ValueError, match=r"no-such-predictor"):
        load(tiny_checkpoint("mixtral"), predictor="no-such-predictor")


# ----------------------------------------------------------------------------------------------------
# damaged safetensors files


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def truncate_data(path):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])


def truncate_tail(path):
    path.write_bytes(path.read_bytes()[:-16])


def truncate_header(path):
    path.write_bytes(path.read_bytes()[:20])


def empty_file(path):
    path.write_bytes(b"")


def garbage_header(path):
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff" * 32
    path.write_bytes(bytes(raw))


def huge_header_length(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def header_not_an_object(path):
    raw, n, _ = _header(path)
    body = b"[]".ljust(n, b" ")
    path.write_bytes(raw[:8] + body + raw[8 + n :])


def _retype_entry(path, pick):
    """Claim F16 for one tensor whose bytes are F32: its byte span no longer matches shape x dtype."""
    raw, n, header = _header(path)
    name = next(k for k in header if k != "__metadata__" and pick(k))
    text = raw[8 : 8 + n].decode()
    start = text.index(json.dumps(name) + ":")
    i = text.index('"F32"', start)
    body = (text[:i] + '"F16"' + text[i + 5 :]).encode()
    assert len(body) == n
    path.write_bytes(raw[:8] + body + raw[8 + n :])


def retype_expert_tensor(path):
    _retype_entry(path, lambda k: ".experts." in k)


def retype_dense_tensor(path):
    _retype_entry(path, lambda k: "embed_tokens" in k)


DAMAGE = [
    truncate_data,
    truncate_tail,
    truncate_header,
    empty_file,
    garbage_header,
    huge_header_length,
    header_not_an_object,
    retype_expert_tensor,
    retype_dense_tensor,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_safetensors(ckpt_copy, damage):
    path = ckpt_copy("mixtral")
    damage(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_and_run(path)


@pytest.mark.parametrize("damage", [truncate_data, garbage_header], ids=lambda f: f.__name__)
def test_damaged_shard_is_named(ckpt_copy, damage):
    path = ckpt_copy("mixtral", sharded=True)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    victim = shards[len(shards) // 2]
    damage(victim)
    with pytest.raises(ValueError, match=re.escape(victim.name)):
        load_and_run(path)


def test_missing_shard_is_named(ckpt_copy):
    path = ckpt_copy("mixtral", sharded=True)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(victim.name)):
        load(path)


def test_corrupt_index_is_named(ckpt_copy):
    path = ckpt_copy("mixtral", sharded=True)
    (path / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        load(path)

"""``moe_engine.from_pretrained`` takes the arguments transformers users pass (dtype / torch_dtype,
revision, device_map, trust_remote_code, Hub IDs), refuses the ones it cannot honour with a message naming
the fix, and reads budgets by one grammar (``parse_budget``) with over-large budgets clamped out loud."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from tiny_models import expert_bytes, tiny_config, total_expert_bytes

import moe_engine
from moe_engine.runtime.config import parse_budget
from moe_engine.runtime.loader import BudgetClampedWarning


def load(path, **kwargs):
    return moe_engine.from_pretrained(path, **{"budget": 0.5, "device": "cpu", "predictor": None, **kwargs})


# ----------------------------------------------------------------------------------------------------
# dtype and torch_dtype


@pytest.mark.parametrize("kwargs", [{"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16},
                                    {"torch_dtype": "bfloat16"}, {"dtype": "bfloat16", "torch_dtype": torch.bfloat16}],
                         ids=str)  # fmt: skip
def test_dtype_and_its_old_name(tiny_checkpoint, kwargs):
    model = load(tiny_checkpoint("mixtral"), **kwargs)
    assert model.dtype == torch.bfloat16
    assert model.engine.stats().expert_bytes == expert_bytes(tiny_config("mixtral")) // 2  # fp32 -> bf16


def test_dtype_auto_is_the_checkpoints(tiny_checkpoint):
    assert load(tiny_checkpoint("mixtral"), dtype="auto").dtype == torch.float32
    assert load(tiny_checkpoint("mixtral"), torch_dtype="auto").dtype == torch.float32


def test_dtype_and_torch_dtype_disagree(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"dtype=torch\.float16 and torch_dtype=torch\.bfloat16 disagree.*only dtype"):
        load(tiny_checkpoint("mixtral"), dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_bad_dtype_name(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"dtype 'float17' is not a torch dtype"):
        load(tiny_checkpoint("mixtral"), dtype="float17")


# ----------------------------------------------------------------------------------------------------
# device_map, trust_remote_code, revision, unknown arguments


@pytest.mark.parametrize("device_map", ["auto", None])
def test_device_map_auto_or_none(tiny_checkpoint, device_map):
    model = load(tiny_checkpoint("mixtral"), device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("device_map", ["cpu", "balanced", {"": 0}, "sequential"], ids=str)
def test_device_map_refused(tiny_checkpoint, device_map):
    with pytest.raises(ValueError, match=r"device_map=.*moe-engine places experts itself.*device='cpu'"):
        load(tiny_checkpoint("mixtral"), device_map=device_map)


def test_trust_remote_code(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"trust_remote_code=True is not supported.*drop trust_remote_code"):
        load(tiny_checkpoint("mixtral"), trust_remote_code=True)
    assert load(tiny_checkpoint("mixtral"), trust_remote_code=False).engine is not None


def test_revision_is_ignored_for_a_local_directory(tiny_checkpoint):
    assert load(tiny_checkpoint("mixtral"), revision="v1.0").engine is not None


def test_unknown_keyword_lists_the_accepted_ones(tiny_checkpoint):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) low_cpu_mem_usage; it accepts: "
                                        r"path, budget, policy, device, dtype, .*torch_dtype, revision, device_map"):  # fmt: skip
        load(tiny_checkpoint("mixtral"), low_cpu_mem_usage=True)


# ----------------------------------------------------------------------------------------------------
# paths and Hugging Face Hub IDs (no network: offline mode and a local Hub cache)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, offline."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_missing_local_path_message_unchanged(tmp_path, hf_home):
    path = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"model path {path} does not exist")):
        load(path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"model path {path} does not exist")):
        load(str(path))


def test_hub_id_not_in_offline_cache(hf_home):
    with pytest.raises(FileNotFoundError, match=r"Hub model some-org/some-moe is not in the local cache.*"
                                                r"HF_HUB_OFFLINE=1.*hf download some-org/some-moe"):  # fmt: skip
        load("some-org/some-moe")


def test_hub_id_loads_from_local_cache_offline(tiny_checkpoint, hf_home):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--tiny-org--tiny-moe"
    shutil.copytree(tiny_checkpoint("mixtral"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load("tiny-org/tiny-moe")
    assert model.engine.stats().num_slots == total_expert_bytes(tiny_config("mixtral")) // 2 // expert_bytes(
        tiny_config("mixtral")
    )
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert load("tiny-org/tiny-moe", revision=commit).engine is not None
    with pytest.raises(FileNotFoundError, match=r"tiny-org/tiny-moe at revision 'v9' is not in the local cache"):
        load("tiny-org/tiny-moe", revision="v9")


# ----------------------------------------------------------------------------------------------------
# the budget grammar and clamping


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(0.25, 0.25), (1.0, 1.0), ("0.25", 0.25), ("1.0", 1.0), ("1", 1.0), ("25%", 0.25), ("100%", 1.0),
     (3, 3), ("3", 3), ("1e9", 10**9), ("48KiB", 48 * 1024), ("0.3GB", 300_000_000), ("2.5GiB", 5 * 2**29)],
    ids=repr,
)  # fmt: skip
def test_parse_budget(spec, expected):
    got = parse_budget(spec)
    assert got == expected and type(got) is type(expected), (spec, got)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("2.5", r"fractions need a leading '0\.' or to be '1\.0', and bytes must be whole"),
     ("2.0", r"fractions need a leading '0\.'"),
     (1.5, r"fraction 1\.5 must be in \(0, 1\]"),
     ("150%", r"percentage in \(0, 100\]"),
     ("0.5b", r"bytes must be whole"),
     ("1.5B", r"bytes must be whole"),
     ("0", r"must be positive")],
    ids=repr,
)  # fmt: skip
def test_parse_budget_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(spec)


def test_budget_above_all_experts_is_clamped_with_one_warning(tiny_checkpoint):
    total = total_expert_bytes(tiny_config("mixtral"))
    with pytest.warns(BudgetClampedWarning) as record:
        model = load(tiny_checkpoint("mixtral"), budget=total + 12345)
    clamped = [w for w in record if issubclass(w.category, BudgetClampedWarning)]
    assert len(clamped) == 1
    assert re.search(rf"requested .*\({total + 12345} bytes\), all experts take .*\({total} bytes\), using .*"
                     rf"\({total} bytes\)", str(clamped[0].message)), str(clamped[0].message)  # fmt: skip
    assert model.engine.budget_bytes == total
    assert model.engine.stats().num_slots == total // expert_bytes(tiny_config("mixtral"))


@pytest.mark.parametrize("budget", [1.0, "1.0", "1", "100%"], ids=repr)
def test_all_experts_budget_does_not_warn(tiny_checkpoint, budget):
    total = total_expert_bytes(tiny_config("mixtral"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetClampedWarning)
        model = load(tiny_checkpoint("mixtral"), budget=budget)
    assert model.engine.budget_bytes == total

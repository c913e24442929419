"""Shared fixtures: tiny checkpoints (made once per session) and golden outputs of the stock model.

``tiny_checkpoint(variant, sharded=False)`` returns the directory of a tiny fp32 checkpoint of a variant
in ``tests/tiny_models.VARIANTS``; ``reference(variant)`` returns what stock transformers computes on the
fixed test batch (see ``decode_trace``), so every engine configuration is compared to the same golden run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models: fanning ops out over threads costs far more than it saves (100x slower on a busy
# 2-core machine). Subprocesses started by the tests get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)

import tiny_models  # noqa: E402

DECODE_STEPS = 16
PROMPT_LEN = 9
LEFT_PAD = 4  # row 0 of the batch is left-padded by this many tokens
FP32_ATOL = 1e-5


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


# ----------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``get(variant, sharded=False, tokenizer=False) -> Path``, each checkpoint built once per session."""
    made: dict[tuple[str, bool, bool], Path] = {}

    def get(variant: str, sharded: bool = False, tokenizer: bool = False) -> Path:
        key = (variant, sharded, tokenizer)
        if key not in made:
            name = variant + ("-sharded" if sharded else "") + ("-tok" if tokenizer else "")
            made[key] = tiny_models.make_tiny_moe(
                variant,
                tmp_path_factory.mktemp(name),
                max_shard_size="40KB" if sharded else None,
                tokenizer=tokenizer,
            )
        return made[key]

    return get


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def unsupported_moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.make_tiny_unsupported_moe(tmp_path_factory.mktemp("phimoe"))


# ----------------------------------------------------------------------------------------------------
# the fixed test batch and a step-by-step greedy decode


def fixed_batch():
    """input_ids, attention_mask: ``[2, PROMPT_LEN]``; row 0 left-padded by LEFT_PAD pad tokens."""
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, tiny_models.VOCAB_SIZE, (2, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :LEFT_PAD] = tiny_models.PAD_ID
    mask[0, :LEFT_PAD] = 0
    return ids, mask


@dataclass
class DecodeTrace:
    """Prefill logits ``[B, T, V]``, then one ``[B, V]`` logits per decode step, and the tokens fed."""

    prefill_logits: object
    step_logits: list
    tokens: object  # [B, DECODE_STEPS] int64: greedy tokens fed at each decode step
    generated: object  # [B, T + DECODE_STEPS] output of model.generate (greedy)


def decode_trace(model, forced_tokens=None, steps: int = DECODE_STEPS) -> DecodeTrace:
    """Prefill the test batch, then ``steps`` decode forwards through the KV cache.

    The token fed at each step is the greedy choice, or ``forced_tokens[:, s]`` when given (so the engine
    is compared on exactly the golden run's inputs). Position ids follow the left padding, as generate does.
    """
    import inspect

    import torch

    # transformers 5.24 renamed the KV-cache argument and output field past_key_values -> cache.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids, mask = fixed_batch()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        prefill = out.logits.float().clone()
        past = getattr(out, cache_name)
        nxt = out.logits[:, -1].argmax(-1)
        steps_logits, fed = [], []
        for s in range(steps):
            tok = nxt if forced_tokens is None else forced_tokens[:, s]
            fed.append(tok)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{cache_name: past},
            )
            past = getattr(out, cache_name)
            steps_logits.append(out.logits[:, -1].float().clone())
            nxt = out.logits[:, -1].argmax(-1)
        ids, mask = fixed_batch()
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=tiny_models.PAD_ID,
            eos_token_id=None,  # always run every step
        )
    return DecodeTrace(prefill, steps_logits, torch.stack(fed, dim=1), generated)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint) -> Callable[..., DecodeTrace]:
    """``get(variant, sharded=False) -> DecodeTrace`` of stock transformers (fp32), computed once."""
    import torch
    from transformers import AutoModelForCausalLM

    done: dict[tuple[str, bool], DecodeTrace] = {}

    def get(variant: str, sharded: bool = False) -> DecodeTrace:
        if (variant, sharded) not in done:
            path = tiny_checkpoint(variant, sharded=sharded)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            done[(variant, sharded)] = decode_trace(model)
            del model
        return done[(variant, sharded)]

    return get


def assert_same_trace(got: DecodeTrace, want: DecodeTrace, atol: float = FP32_ATOL, what: str = "") -> None:
    """Every logit within ``atol`` (NaN where the reference has NaN), greedy tokens identical."""
    import torch

    def close(a, b, where: str) -> None:
        assert a.shape == b.shape, f"{what} {where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a.isnan(), b.isnan()), f"{what} {where}: NaNs differ"
        diff = (a - b).abs().nan_to_num(0.0).max().item()
        assert diff <= atol, f"{what} {where}: max abs logit diff {diff:.3g} > {atol}"

    close(got.prefill_logits, want.prefill_logits, "prefill")
    for s, (a, b) in enumerate(zip(got.step_logits, want.step_logits, strict=True)):
        close(a, b, f"decode step {s}")
    assert torch.equal(got.tokens, want.tokens), f"{what}: greedy tokens differ"
    assert torch.equal(got.generated, want.generated), (
        f"{what}: generate() output differs:\n{got.generated}\nvs stock\n{want.generated}"
    )

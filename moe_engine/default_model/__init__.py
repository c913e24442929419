"""moe-engine's embedded default model: a small Qwen3-MoE trained on public-domain English.

8 MoE layers x 16 experts, top-2, byte-level BPE vocabulary of 6,144; trained by
``benchmarks/train_default_model.py`` on Shakespeare (Project Gutenberg) and the King James Bible.
The folder holds bf16 safetensors, ``config.json`` and the tokenizer, so stock transformers loads it::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moe_engine.default_model import default_model_path, DEFAULT_PROMPT

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)

See README.md beside this file (the model card) for corpus, licence, training command and figures.
"""

from __future__ import annotations

from pathlib import Path

#: Prompt used by ``moe-engine generate`` when none is given (in the style of the training corpus).
DEFAULT_PROMPT = "And the king said unto his servants,"

_HERE = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """Folder of the embedded default checkpoint (config, bf16 safetensors, tokenizer).

    Raises FileNotFoundError naming the fix when the package was installed without its model files.
    """
    if not (_HERE / "config.json").exists() or not any(_HERE.glob("*.safetensors")):
        raise FileNotFoundError(
            f"the embedded default model is missing from {_HERE} (no config.json / *.safetensors); "
            "reinstall moe-engine, or retrain it with `python benchmarks/train_default_model.py`"
        )
    return _HERE

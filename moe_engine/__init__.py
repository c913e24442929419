"""moe-engine: run Hugging Face Mixture-of-Experts checkpoints with experts offloaded under a hard budget.

Example::

    import moe_engine
    model = moe_engine.from_pretrained(path, budget="256MiB", policy="lru", device="cpu")
    out = model.generate(input_ids, max_new_tokens=32)
    print(model.engine.stats())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moe_engine.runtime.loader import from_pretrained as from_pretrained


# Errors a caller may want to catch, importable from the top level.
_ERRORS = {
    "CheckpointError": "moe_engine.runtime.store",
    "CheckpointChangedError": "moe_engine.runtime.store",
    "ExpertReadError": "moe_engine.runtime.cache",
    "ModelClosedError": "moe_engine.runtime.engine",
}


def __getattr__(name: str) -> Any:
    # Lazy: importing moe_engine (e.g. for the CLI's --help) must not import torch/transformers.
    if name == "from_pretrained":
        from moe_engine.runtime.loader import from_pretrained

        return from_pretrained
    if name in _ERRORS:
        import importlib

        return getattr(importlib.import_module(_ERRORS[name]), name)
    if name == "serve":  # moe_engine.serve(...) starts the OpenAI-compatible server (the package is callable)
        import importlib

        return importlib.import_module("moe_engine.serve")
    if name == "default_model_path":
        from moe_engine.default_model import default_model_path

        return default_model_path
    raise AttributeError(f"module 'moe_engine' has no attribute {name!r}")


__all__ = ["from_pretrained", "default_model_path", "serve", "__version__", *_ERRORS]

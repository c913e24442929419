"""moe-engine's OpenAI-compatible server with continuous batching and expert-aware scheduling.

Modules: ``server`` (``serve``, ``build``, ``ServerThread``), ``app`` (routes, validation, SSE,
errors), ``batcher`` (the engine thread: continuous batching over per-sequence KV caches),
``scheduler`` (which sequences share a decode step: ``fcfs``, ``expert_aware``), ``metrics``
(Prometheus text).

``moe_engine.serve`` is both this package and callable: ``moe_engine.serve(...)`` is
``moe_engine.serve.serve(...)`` (a module whose class defines ``__call__``), so the name works
whichever was imported first.

Example::

    import moe_engine.serve
    moe_engine.serve(budget=0.25, port=8000)   # blocks until SIGTERM / Ctrl-C, then drains
"""

from __future__ import annotations

import sys
import types
from typing import Any


def serve(model: Any = None, **options: Any) -> int:
    """Serve ``model`` (None: the embedded default model); see ``moe_engine.serve.server.serve``."""
    from moe_engine.serve.server import serve as _serve

    return _serve(model, **options)


class _CallableModule(types.ModuleType):
    def __call__(self, model: Any = None, **options: Any) -> int:
        return serve(model, **options)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["serve"]

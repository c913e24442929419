"""Building and running the server: ``serve(...)`` (blocking, what ``moe-engine serve`` runs),
``build(...)`` (model + batcher + app, for embedding) and ``ServerThread`` (uvicorn in a thread, for
tests and benchmarks).

Shutdown: on SIGTERM or SIGINT uvicorn stops accepting connections and waits for the open ones (the
streams in flight keep being served by the engine thread); then the app's lifespan ends: the batcher
finishes what is left (drain) and stops, and the model is closed. ``serve`` returns 0 then.

Example::

    import moe_engine.serve
    moe_engine.serve(budget=0.25, port=8000)          # the embedded default model
    # or, in a thread:
    with ServerThread(build(model_path=None, budget=0.25)) as srv:
        print(srv.url)
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_engine.serve.app import Limits, Service, create_app
from moe_engine.serve.batcher import Batcher, BatcherConfig

DEFAULT_MODEL_ID = "moe-engine-default"


@dataclass
class Built:
    """A ready-to-serve app and what it owns."""

    app: Any  # FastAPI
    service: Service
    batcher: Batcher
    model: Any
    owns_model: bool


def build(
    model_path: str | os.PathLike | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    budget: int | float | str = 0.25,
    policy: str = "auto",
    predictor: str | None = "cross_layer_gate",
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    served_model_name: str | None = None,
    max_seqs: int = 32,
    max_queue: int = 512,
    step_seqs: int | None = None,
    prefill_chunk: int = 128,
    schedule: str = "expert_aware",
    max_wait: int = 2,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 256,
    timeout: float | None = 600.0,
    allowed_origins: Sequence[str] = ("*",),
) -> Built:
    """Load the model (unless ``model`` is given, a ``moe_engine.from_pretrained`` model) and wire the app.

    ``model_path`` None: the embedded default model. ``budget``/``policy``/``predictor``/``device``/``dtype``/
    ``threads`` go to ``from_pretrained`` (``predictor`` "none": no prefetch); ``schedule`` is the step scheduler (``"expert_aware"`` or ``"fcfs"``);
    ``step_seqs`` caps sequences per decode step (default ``max_seqs``); ``allowed_origins``: web origins
    allowed to call the API from a browser (CORS; ``("*",)`` any, empty: none).
    """
    from transformers import AutoTokenizer

    config = BatcherConfig(
        max_seqs=max_seqs, max_queue=max_queue, step_seqs=step_seqs or max_seqs, prefill_chunk=prefill_chunk,
        policy=schedule, max_wait=max_wait, timeout_s=timeout,
    )  # fmt: skip
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    owns = model is None
    if model_path is None and model is None:
        from moe_engine.default_model import default_model_path

        model_path = default_model_path()
        served_model_name = served_model_name or DEFAULT_MODEL_ID
    if model is None:
        from moe_engine.runtime.loader import from_pretrained

        assert model_path is not None
        if predictor in ("none", "") or policy == "none":
            predictor = None
        model = from_pretrained(model_path, budget=budget, policy=policy, predictor=predictor, device=device,
                                dtype=dtype, threads=threads)  # fmt: skip
    if tokenizer is None:
        path = model_path if model_path is not None else getattr(model.config, "_name_or_path", None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            if owns:
                model.close()
            raise ValueError(f"no usable tokenizer for {path} ({' '.join(str(exc).split())}); save one beside "
                             "the model") from None  # fmt: skip
    if served_model_name is None:
        served_model_name = Path(str(model_path or model.config._name_or_path)).name or "model"
    gen = getattr(model, "generation_config", None)
    penalty = float(getattr(gen, "repetition_penalty", None) or 1.0)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
    context = getattr(model.config, "max_position_embeddings", None)
    if max_prompt_tokens is None:
        max_prompt_tokens = max(1, (context - 1) if context else 4096)
    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be at least 1, got {max_prompt_tokens}")
    batcher = Batcher(model, config, pad_token_id=pad)
    service = Service(tokenizer, batcher, served_model_name, Limits(max_prompt_tokens, max_new_tokens, context),
                      penalty, eos_ids)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            service.draining = True
            import asyncio

            await asyncio.to_thread(batcher.stop, True)  # finish what is in flight, then stop the engine thread
            if owns:
                model.close()

    return Built(create_app(service, lifespan=lifespan, allowed_origins=allowed_origins), service, batcher, model, owns)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``built.app`` on ``host:port`` in a daemon thread (signals stay with the caller)."""

    def __init__(self, built: Built, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.built = built
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(built.app, host=host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=30))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, name="moe-engine-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets it once the socket listens
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)  # polling uvicorn's started flag; it offers no event to wait on
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_exit_server():
    """uvicorn's Server, but SIGTERM/SIGINT only ask it to shut down gracefully: uvicorn re-raises the
    captured signal after shutting down (the process then dies by SIGTERM, status -15); a server that
    drained its requests cleanly should exit 0."""
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


def serve(
    model: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options: Any,
) -> int:
    """Serve ``model`` (a checkpoint directory or Hub ID; None: the embedded default model) over the
    OpenAI API until SIGTERM/SIGINT; drains requests in flight, then returns 0. ``options`` are
    ``build``'s (budget, policy, predictor, device, dtype, threads, served_model_name, max_seqs, max_queue, step_seqs,
    prefill_chunk, schedule, max_wait, max_prompt_tokens, max_new_tokens, timeout, allowed_origins)."""
    import uvicorn

    built = build(model, **options)
    timeout = options.get("timeout", 600.0)
    config = uvicorn.Config(built.app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(timeout) + 5 if timeout else None)  # fmt: skip
    _quiet_exit_server()(config).run()
    return 0

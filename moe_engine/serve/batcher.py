"""Continuous batching over one offloaded model: a single engine thread owns the model and runs steps.

Why by hand and not transformers' continuous batching (``generate_batch`` / ``init_continuous_batching``):
checked on transformers 5.24 with the default model behind the engine (fp32, greedy, 3 prompts x 12
tokens): with ``repetition_penalty=1.0`` its outputs equal ``generate()`` exactly, but (1) the default
model's ``generation_config.json`` sets ``repetition_penalty=1.3``, which ``generate()`` applies and the
continuous-batching logits processors (temperature, top-k, top-p) do not, so its outputs diverge from
``generate()`` from the 2nd token; (2) sampling settings are one per manager, not per request, as the
OpenAI API needs; (3) expert-aware scheduling must choose which sequences share a step and attribute
each token's routing to its request, while its schedulers pick by KV blocks and token budget over a
flattened batch. A step loop over per-sequence KV caches is small, exact and gives that control.

Glossary:
    sequence: one request being served: its prompt, generated tokens and its own KV cache (per decoder
        layer a ``[heads, capacity, head_dim]`` buffer, no padding inside).
    step: one iteration of the engine thread: one decode forward for the sequences the scheduler
        chose (one token each), then one prefill forward for up to ``prefill_chunk`` prompt tokens of
        admitted sequences (long prompts are chunked, so decode keeps flowing between chunks).
    batch layout of a forward: row ``b`` = ``[left pad][past KV of b][new tokens of b][right pad]``,
        with a 2D attention mask that hides every pad column and explicit ``position_ids``; the
        hidden state of each row's last real token goes through the LM head (no padded query row is
        ever fully masked, and no logits are computed for pads). The forward is the model's own
        (``model.get_decoder()`` + ``get_output_embeddings()``) with a ``DynamicCache`` built from the
        rows; each row's new K/V columns are copied back into its own cache.
    held batch: after a decode forward, its ``DynamicCache`` (already holding every row's new column)
        is kept; the next decode forward of the same sequences in the same order goes on with it
        instead of rebuilding it from the per-sequence caches and copying the new columns back (two
        copies of every row's whole cache per step, the batch's largest cost outside the model). The
        rows' layout is the same as a rebuild's (left pads grow with ``P``), so the outputs are too. A
        forward of other rows first copies the held columns back into their sequences' caches.
    events: the engine thread reports each sequence's tokens through ``sink(Event)`` (called on the
        engine thread: the server forwards it to its event loop).

Exactness: greedy decoding, with the model's repetition penalty, equals ``model.generate()`` for the
prompt alone (``tests/test_serve.py`` checks it for concurrent requests in fp32).

Prefill vs the decode working set: a prefill chunk routes many tokens and touches most experts of
every layer, which under LRU would evict the experts decode sequences keep using. The engine's prefill
policy handles it (``moe_engine.runtime.engine``, ``prefill_policy="stream"``, the default): the
decoder hook marks every forward with more than one new position per row as a prefill, whose loads
leave first afterwards and may displace at most a window of the decode working set, and whose next
layer is read ahead. The batcher also prefills the chunks of all admitted sequences together in one
forward (one sweep over the experts instead of one per request).

Example::

    batcher = Batcher(model, BatcherConfig(max_seqs=8))
    batcher.start()
    seq_id = batcher.submit(prompt_ids, SamplingParams(max_new_tokens=16), sink=print)
    ...
    batcher.stop(drain=True)
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_engine.runtime.interrupts import deferred_interrupts
from moe_engine.serve.scheduler import SCHEDULERS, SeqView, TokenRoutes, choose, next_lag


class QueueFullError(RuntimeError):
    """The server already holds ``max_seqs`` running and ``max_queue`` waiting requests."""


class ShuttingDownError(RuntimeError):
    """The server is draining (SIGTERM) and takes no new requests."""


@dataclass(frozen=True)
class BatcherConfig:
    """Limits and policy of the step loop."""

    max_seqs: int = 32  # sequences prefilling or decoding at once
    max_queue: int = 512  # admitted requests waiting for a sequence slot
    step_seqs: int = 32  # at most this many sequences decode in one step
    prefill_chunk: int = 128  # prompt tokens per prefill forward (all admitted prompts together)
    policy: str = "expert_aware"  # scheduling policy (moe_engine.serve.scheduler.SCHEDULERS)
    max_wait: int = 2  # expert_aware: tokens a ready sequence may fall behind its fair (round-robin) share
    timeout_s: float | None = 600.0  # a request still running after this many seconds ends with "timeout"

    def __post_init__(self) -> None:
        for name in ("max_seqs", "step_seqs", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatcherConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"BatcherConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.policy not in SCHEDULERS:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {sorted(SCHEDULERS)}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"the request timeout must be > 0 seconds (or None), got {self.timeout_s}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature == 0`` is greedy (as ``generate(do_sample=False)``)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Event:
    """One report about a sequence: a new ``token``, or the end (``finish_reason`` set; ``error`` on failure)."""

    seq_id: int
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length", "timeout", "cancelled", "error"
    error: str | None = None


@dataclass
class _Seq:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    arrival: int
    deadline: float | None
    submitted: float
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the KV cache
    length: int = 0  # tokens in the KV cache (its own buffers and, while held, the held batch's)
    stored: int = 0  # of those, tokens in its own buffers (``keys``/``values``)
    keys: list[torch.Tensor] = field(default_factory=list)  # per decoder layer [heads, capacity, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    waited: int = 0  # decode steps left out in a row
    lag: float = 0.0  # tokens behind its fair share of decode steps (scheduler.next_lag)
    last_route: frozenset = frozenset()  # (moe_layer, expert) of its last routed token
    predicted: frozenset = frozenset()  # (moe_layer, expert) its next decode step will likely use
    pending: int | None = None  # sampled token not yet fed to the model
    first_token_at: float | None = None

    def append_kv(self, layer_keys: list[torch.Tensor], layer_values: list[torch.Tensor]) -> None:
        """Append ``[heads, t, head_dim]`` per layer to its own buffers (growing them by doubling)."""
        t, at = layer_keys[0].shape[1], self.stored
        if not self.keys:
            cap = max(16, t)
            self.keys = [k.new_empty(k.shape[0], cap, k.shape[2]) for k in layer_keys]
            self.values = [v.new_empty(v.shape[0], cap, v.shape[2]) for v in layer_values]
        if at + t > self.keys[0].shape[1]:
            cap = max(2 * self.keys[0].shape[1], at + t)
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    new = old.new_empty(old.shape[0], cap, old.shape[2])
                    new[:, :at] = old[:, :at]
                    buffers[i] = new
        for buf, new in zip(self.keys, layer_keys, strict=True):
            buf[:, at : at + t] = new
        for buf, new in zip(self.values, layer_values, strict=True):
            buf[:, at : at + t] = new
        self.stored += t


@dataclass
class BatcherMetrics:
    """Counters of the step loop (read by ``/metrics``); the engine thread writes them."""

    requests_finished: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    output_tokens: int = 0
    decode_steps: int = 0
    prefill_forwards: int = 0
    held_forwards: int = 0  # decode forwards that went on with the held batch's cache (no rebuild)
    step_seqs_total: int = 0
    step_distinct_experts_total: int = 0
    forward_seconds: float = 0.0
    bytes_moved: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    stall_seconds: float = 0.0
    waiting: int = 0
    running: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))  # (time, tokens)

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(k for t, k in list(self.recent) if now - t <= window_s)
        return n / window_s


class Batcher:
    """The engine thread and its queues. ``submit``/``cancel``/``stop`` may be called from any thread."""

    def __init__(self, model, config: BatcherConfig | None = None, *, pad_token_id: int = 0) -> None:
        self.model = model
        self.config = config or BatcherConfig()
        self.pad_token_id = pad_token_id
        self.metrics = BatcherMetrics()
        self._cv = threading.Condition()
        self._incoming: list[_Seq] = []
        self._cancel: set[int] = set()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._prefilling: list[_Seq] = []
        self._ready: dict[int, _Seq] = {}
        self._next_id = 0
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._routes: dict[int, torch.Tensor] = {}
        self._held: tuple[list[_Seq], Any, int] | None = None  # (rows' sequences, DynamicCache, padded length)
        self._token_routes = TokenRoutes()
        self._hooks = []
        self.error: BaseException | None = None
        from moe_engine.runtime.engine import OffloadedExperts

        for module in model.modules():
            if isinstance(module, OffloadedExperts):
                self._hooks.append(module.register_forward_pre_hook(self._record_route))
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="moe-engine-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> int:
        """Queue a request; returns its sequence id. Raises ``QueueFullError`` or ``ShuttingDownError``."""
        if not prompt:
            raise ValueError("the prompt has no tokens; send some text")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        now = time.monotonic()
        with self._cv:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            queued = len(self._incoming) + len(self._waiting)
            if queued >= self.config.max_queue + max(0, self.config.max_seqs - self._active()):
                raise QueueFullError(
                    f"the server is at capacity ({self.config.max_seqs} running, {self.config.max_queue} queued); "
                    "retry later"
                )
            seq_id = self._next_id
            self._next_id += 1
            gen = None
            if params.temperature > 0:
                seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
                gen = torch.Generator().manual_seed(seed)  # per request: the global RNG is left alone
            deadline = now + self.config.timeout_s if self.config.timeout_s is not None else None
            self._incoming.append(_Seq(seq_id, list(prompt), params, sink, seq_id, deadline, now, gen))
            self._cv.notify()
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Free ``seq_id``'s slot at the next step boundary (a client that went away)."""
        with self._cv:
            self._cancel.add(seq_id)
            self._cv.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` finish the ones in flight, else cancel them; join the thread."""
        with self._cv:
            self._stopping = True
            self._drain = drain
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def active(self) -> int:
        """Sequences prefilling or decoding now."""
        return self.metrics.running

    # ------------------------------------------------------------------ engine thread
    def _active(self) -> int:
        return len(self._prefilling) + len(self._ready)

    def _record_route(self, module, args) -> None:
        self._routes[module.moe_index] = args[1]

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        self._prefilling = [s for s in self._prefilling if s is not seq]
        self._ready.pop(seq.seq_id, None)
        seq.keys, seq.values = [], []  # free the KV cache at once
        self.metrics.requests_finished[reason] += 1
        seq.sink(Event(seq.seq_id, finish_reason=reason, error=error))

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._cancel or self._waiting or self._active() or self._stopping):
                        self._cv.wait()
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                    cancel, self._cancel = self._cancel, set()
                    if self._stopping and not self._drain:
                        cancel |= {s.seq_id for s in self._waiting} | {s.seq_id for s in self._prefilling}
                        cancel |= set(self._ready)
                    if self._stopping and not (self._waiting or self._active()) and not cancel:
                        return
                self._drop(cancel)
                self._expire()
                while self._waiting and self._active() < self.config.max_seqs:
                    seq = self._waiting.popleft()
                    self._prefilling.append(seq)
                    self.metrics.prompt_tokens += len(seq.prompt)
                if self._ready:
                    self._decode_step()
                if self._prefilling:
                    self._prefill_step()
                if self._held is not None and not self._ready:
                    self._release_held()  # every held sequence has ended: free the batch's cache now
                self.metrics.waiting = len(self._waiting)
                self.metrics.running = self._active()
        except BaseException as exc:  # the thread must not die silently: fail every request, remember why
            self.error = exc
            with self._cv:
                self._stopping = True
                everyone = list(self._waiting) + self._prefilling + list(self._ready.values()) + self._incoming
            for seq in everyone:
                seq.sink(Event(seq.seq_id, finish_reason="error", error=f"the engine thread failed: {exc!r}"))
            raise

    def _drop(self, ids: set[int]) -> None:
        if not ids:
            return
        for seq in [s for s in self._waiting if s.seq_id in ids]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self._prefilling if s.seq_id in ids] + [s for i, s in self._ready.items() if i in ids]:
            self._finish(seq, "cancelled")

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.deadline is not None and now > s.deadline]:
            self._waiting.remove(seq)
            self._finish(seq, "timeout", f"the request ran past the server's {self.config.timeout_s:g} s timeout")
        for seq in self._prefilling + list(self._ready.values()):
            if seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout", f"the request ran past the server's {self.config.timeout_s:g} s timeout")

    def _resident(self) -> frozenset:
        engine = getattr(self.model, "engine", None)
        core = getattr(engine, "core", None)
        if core is None:
            return frozenset()
        with deferred_interrupts(), engine.lock:
            return frozenset(core.entries)

    def _decode_step(self) -> None:
        for s in self._ready.values():  # the pending token is known: predict by where that token id went last
            s.predicted = self._token_routes.predict(s.pending, s.last_route)
        views = [SeqView(s.seq_id, s.arrival, s.waited, s.predicted, s.lag) for s in self._ready.values()]
        resident = self._resident() if self.config.policy == "expert_aware" else frozenset()
        chosen_ids = choose(self.config.policy, views, self.config.step_seqs, resident, self.config.max_wait)
        chosen = [self._ready[i] for i in chosen_ids]
        n_ready = len(self._ready)
        for s in self._ready.values():
            picked = s.seq_id in chosen_ids
            s.waited = 0 if picked else s.waited + 1
            s.lag = next_lag(s.lag, n_ready, self.config.step_seqs, picked)
        rows = []
        for s in chosen:
            assert s.pending is not None
            rows.append((s, [s.pending]))
        engine = getattr(self.model, "engine", None)
        if engine is not None:  # the step's predicted experts are the engine's prefetch plan (if it prefetches)
            with engine.expected_experts([key for s in chosen for key in s.predicted]):  # one vote per sequence
                logits = self._forward(rows)
        else:
            logits = self._forward(rows)
        self.metrics.decode_steps += 1
        self.metrics.step_seqs_total += len(chosen)
        self.metrics.step_distinct_experts_total += len(frozenset().union(*(s.predicted for s in chosen)))
        if logits is None:
            return
        for b, s in enumerate(chosen):
            s.pending = None
            self._emit(s, logits[b])

    def _prefill_step(self) -> None:
        rows, budget = [], self.config.prefill_chunk
        for s in list(self._prefilling):
            if budget <= 0:
                break
            n = min(len(s.prompt) - s.prefilled, budget)
            rows.append((s, s.prompt[s.prefilled : s.prefilled + n]))
            budget -= n
        logits = self._forward(rows)
        self.metrics.prefill_forwards += 1
        if logits is None:
            return
        for b, (s, chunk) in enumerate(rows):
            s.prefilled += len(chunk)
            if s.prefilled == len(s.prompt):
                self._prefilling.remove(s)
                self._ready[s.seq_id] = s
                self._emit(s, logits[b])

    def _release_held(self) -> None:
        """Copy the held batch's columns back into its live sequences' own caches and drop it."""
        held, self._held = self._held, None
        if held is None:
            return
        seqs, cache, P = held
        with torch.inference_mode():  # the caches are inference tensors
            for b, s in enumerate(seqs):
                n = s.length - s.stored
                if s.keys and n > 0:  # finished sequences have freed their caches: nothing to keep
                    s.append_kv([layer.keys[b, :, P - n : P] for layer in cache.layers],
                                [layer.values[b, :, P - n : P] for layer in cache.layers])  # fmt: skip

    def _forward(self, rows: list[tuple[_Seq, list[int]]]) -> torch.Tensor | None:
        """One forward of the model for ``rows``; returns the logits of each row's last token ``[B, V]``
        (fp32), or None when the forward failed (its sequences end with an error event). A decode
        forward (one token per row) keeps its cache as the held batch; the next one of the same rows
        continues it (module docstring)."""
        device = self.model.device
        seqs = [s for s, _ in rows]
        B = len(rows)
        T = max(len(new) for _, new in rows)
        decode = T == 1
        held = self._held
        reuse = (
            decode and held is not None and len(held[0]) == B and all(a is b for a, b in zip(held[0], seqs))
        )
        if not reuse and held is not None and (decode or {id(s) for s in seqs} & {id(h) for h in held[0]}):
            self._release_held()
        lengths = torch.tensor([s.length for s in seqs])
        P = held[2] if reuse and held is not None else int(lengths.max())
        news = torch.tensor([len(new) for _, new in rows])
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        for b, (_, new) in enumerate(rows):
            input_ids[b, : len(new)] = torch.tensor(new)
        cols = torch.arange(P + T)
        mask = ((cols >= P - lengths[:, None]) & (cols < P + news[:, None])).long()
        positions = lengths[:, None] + torch.arange(T)  # pads continue the count (masked anyway)
        last = news - 1
        t0 = time.perf_counter()
        try:
            from transformers import DynamicCache

            with torch.inference_mode():
                if reuse and held is not None:
                    cache = held[1]
                    self.metrics.held_forwards += 1
                    self._held = None  # updated in place below: not a held batch again until it succeeds
                else:
                    cache = DynamicCache()
                    if P > 0:
                        layers = []
                        ref = next(s for s in seqs if s.keys)
                        for i in range(len(ref.keys)):
                            h, _, d = ref.keys[i].shape
                            k = ref.keys[i].new_zeros(B, h, P, d)
                            v = ref.values[i].new_zeros(B, h, P, d)
                            for b, s in enumerate(seqs):
                                if s.length:
                                    k[b, :, P - s.length :] = s.keys[i][:, : s.length]
                                    v[b, :, P - s.length :] = s.values[i][:, : s.length]
                            layers.append((k, v))
                        cache = DynamicCache(ddp_cache_data=layers)
                self._routes.clear()
                out = self._decoder(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    cache=cache,
                    use_cache=True,
                )
                hidden = out.last_hidden_state[torch.arange(B), last.to(device)]  # [B, H]
                logits = self._head(hidden).float()  # [B, V]
                moe_layers = sorted(self._routes)
                routed = [self._routes[layer].reshape(B, T, -1).tolist() for layer in moe_layers]  # [L][B][T][k]
                for b, (s, new) in enumerate(rows):
                    t = len(new)
                    if not decode:  # a prefill's right pads must not stay: its new columns go back now
                        s.append_kv(
                            [layer.keys[b, :, P : P + t] for layer in cache.layers],
                            [layer.values[b, :, P : P + t] for layer in cache.layers],
                        )
                    s.length += t
                    for j, token in enumerate(new):  # real tokens only: the right pads' routes are not recorded
                        self._token_routes.record(token, tuple((m, tuple(r[b][j])) for m, r in zip(moe_layers, routed)))
                    if moe_layers:
                        s.last_route = frozenset(
                            (m, e) for m, r in zip(moe_layers, routed, strict=True) for e in r[b][t - 1]
                        )
                if decode:
                    self._held = (seqs, cache, P + 1)
        except Exception as exc:  # a failed read (ExpertReadError), a closed model...: those requests fail
            for s, _ in rows:
                self._finish(s, "error", f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.metrics.forward_seconds += time.perf_counter() - t0
            self._snapshot_stats()
        return logits

    def _snapshot_stats(self) -> None:
        engine = getattr(self.model, "engine", None)
        if engine is None:
            return
        st = engine.stats()
        m = self.metrics
        m.bytes_moved, m.hits, m.late_hits, m.misses, m.stall_seconds = (
            st.bytes_moved, st.hits, st.late_hits, st.misses, st.stall_seconds
        )

    def _emit(self, s: _Seq, logits: torch.Tensor) -> None:
        token = self._sample(s, logits)
        now = time.monotonic()
        if s.first_token_at is None:
            s.first_token_at = now
        self.metrics.recent.append((now, 1))
        if token in s.params.stop_token_ids:
            self._finish(s, "stop")
            return
        s.tokens.append(token)
        self.metrics.output_tokens += 1
        s.sink(Event(s.seq_id, token=token))
        if len(s.tokens) >= s.params.max_new_tokens:
            self._finish(s, "length")
        else:
            s.pending = token

    @staticmethod
    def _sample(s: _Seq, logits: torch.Tensor) -> int:
        """Next token from fp32 logits ``[V]``, processed as transformers' ``generate`` does: repetition
        penalty (``RepetitionPenaltyLogitsProcessor``), then temperature and top-p when sampling."""
        p = s.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(s.prompt + s.tokens, device=logits.device)
            score = logits.gather(0, ids)
            score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            logits = logits.scatter(0, ids, score)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= 1 - p.top_p
            remove[-1] = False  # keep at least one token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=s.generator))

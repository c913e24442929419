"""The OpenAI-compatible server (``moe_engine.serve``): a real ``openai`` client and httpx against
uvicorn on a free port, the embedded default model in fp32 at a 25 % budget.

Checks: concurrent streaming chat requests all complete and each greedy answer equals
``model.generate()`` for that prompt alone; non-streaming completions (text and token-id prompts);
/v1/models, /health and /metrics; OpenAI-style 4xx errors; a client that disconnects mid-stream frees
its sequence; timeouts and capacity (408, 429); the schedulers' choices; SIGTERM drains a stream in
flight and the process exits 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from moe_engine.serve.app import SIMPLE_CHAT_TEMPLATE, render_chat
from moe_engine.serve.scheduler import SeqView, TokenRoutes, choose, next_lag
from moe_engine.serve.server import ServerThread, build, free_port

MODEL_ID = "moe-engine-default"
EOS = 0
NAMES = ["Romeo", "Juliet", "Moses", "David", "Hamlet", "Ophelia", "Samuel", "Lear", "Portia", "Aaron", "Caesar",
         "Brutus", "Isaac", "Jacob", "Esther", "Ruth", "Macbeth", "Banquo", "Noah", "Abraham", "Othello", "Iago",
         "Miranda", "Prospero", "Saul", "Solomon", "Paul", "Peter", "Falstaff", "Hal", "Cordelia", "Edmund"]  # fmt: skip
N_CONCURRENT = 16  # 32 (and more) run in benchmarks/serve_eval.py; 16 keeps this test a few seconds
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import AutoTokenizer

    import moe_engine

    path = moe_engine.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = moe_engine.from_pretrained(path, budget=0.25, device="cpu", dtype="float32", threads=1)
    yield model, tok
    model.close()


@pytest.fixture(scope="module")
def stock_model():
    """Stock transformers on the same checkpoint, fp32: the golden ``generate()`` (the engine's own
    ``generate()`` equals it bit for bit, tests/test_lossless.py; stock is 2.5x faster on CPU)."""
    from transformers import AutoModelForCausalLM

    import moe_engine

    return AutoModelForCausalLM.from_pretrained(moe_engine.default_model_path(), dtype=torch.float32)


@pytest.fixture(scope="module")
def server(model_and_tok):
    model, tok = model_and_tok
    built = build(model=model, tokenizer=tok, served_model_name=MODEL_ID, max_seqs=32, max_prompt_tokens=64,
                  max_new_tokens=256, prefill_chunk=64)  # fmt: skip
    with ServerThread(built) as srv:
        yield srv


def _alone(model, ids: list[int], n: int, tok) -> str:
    """What ``model.generate()`` answers for ``ids`` alone, greedy, as text (ends at EOS)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=EOS)
    new = out[0, len(ids) :].tolist()
    if EOS in new:
        new = new[: new.index(EOS)]
    return tok.decode(new, skip_special_tokens=True)


def _metric(text: str, name: str) -> float:
    """The value of sample ``name`` (with its labels, if any) in Prometheus text; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_idle(srv: ServerThread, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(srv.url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server still holds sequences: {health}"
        time.sleep(0.05)  # polling the server's state


def test_concurrent_streaming_chat_equals_generate_alone(server, model_and_tok, stock_model):
    import openai

    _, tok = model_and_tok
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [[{"role": "user", "content": f"Tell me of {name}."}] for name in NAMES[:N_CONCURRENT]]

    def ask(msgs):
        stream = client.chat.completions.create(model=MODEL_ID, messages=msgs, stream=True, temperature=0,
                                                max_tokens=MAX_TOKENS)  # fmt: skip
        text, finish, roles = "", None, []
        for chunk in stream:
            delta = chunk.choices[0].delta
            roles.append(delta.role)
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish, roles

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(N_CONCURRENT) as pool:
        answers = list(pool.map(ask, messages))
    print(f"served {len(messages)} in {time.perf_counter() - t0:.2f} s")
    assert tok.chat_template is None  # the default model has none: the documented simple template applies
    for msgs, (text, finish, roles) in zip(messages, answers, strict=True):
        ids = render_chat(tok, msgs)
        assert tok.decode(ids) == f"User: {msgs[0]['content']}\nAssistant:"
        assert roles[0] == "assistant" and finish in ("length", "stop")
        assert text == _alone(stock_model, ids, MAX_TOKENS, tok)
    metrics = httpx.get(server.url + "/metrics").text
    steps = _metric(metrics, 'moe_serve_decode_steps_total{policy="expert_aware"}')
    seqs = _metric(metrics, 'moe_serve_step_sequences_total{policy="expert_aware"}')
    assert seqs / steps > 2, "requests did not share decode steps"  # continuous batching did batch them


def test_completions_non_streaming(server, model_and_tok):
    import openai

    model, tok = model_and_tok
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    prompt = "And the king said unto his servants,"
    ids = tok(prompt)["input_ids"]
    res = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0)
    assert res.choices[0].text == _alone(model, ids, 6, tok)
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens > 0
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == res.choices[0].text
    chat = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=5, temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == _alone(model, render_chat(tok, [{"role": "user", "content": "Speak."}]), 5, tok)
    # stop strings end the answer where they start, finish_reason "stop"
    full = res.choices[0].text
    if len(full.strip()) > 2:
        stop = full.strip()[1:3]
        cut = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_ID]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "O Romeo", "max_tokens": 3})
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("moe_serve_http_requests_total", "moe_serve_queue_depth", "moe_serve_output_tokens_per_second",
                 "moe_serve_expert_hit_rate", "moe_serve_expert_bytes_moved_total", "moe_serve_stall_seconds_total",
                 "moe_serve_output_tokens_total"):  # fmt: skip
        assert name in text, name
    moved = _metric(text, "moe_serve_expert_bytes_moved_total")
    assert moved > 0  # 25 % budget: experts moved
    assert 'moe_serve_http_requests_total{path="/v1/completions",status="200"}' in text


def test_a_browser_page_on_another_origin_may_call_the_api(server):
    """What a browser's ``fetch`` from a page on another origin needs (CORS): the allow-origin header on
    answers, and a preflight for a JSON POST answered before any route sees it."""
    origin = "http://localhost:3000"
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(server.url + path, headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", path
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()


def test_cross_origin_calls_can_be_turned_off(model_and_tok):
    model, tok = model_and_tok
    built = build(model=model, tokenizer=tok, served_model_name=MODEL_ID, allowed_origins=())
    with ServerThread(built) as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (b"{not json", 400, None, None),
        (b"[1, 2]", 400, None, None),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
        ({"prompt": "hi"}, 400, "model", None),
        ({"model": MODEL_ID, "prompt": "word " * 100}, 400, None, "context_length_exceeded"),
        ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens", None),
        ({"model": MODEL_ID, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ({"model": MODEL_ID, "prompt": "hi", "top_p": "high"}, 400, "top_p", None),
        ({"model": MODEL_ID, "prompt": "hi", "n": 2}, 400, "n", None),
        ({"model": MODEL_ID, "prompt": ""}, 400, "prompt", None),
        ({"model": MODEL_ID, "prompt": {"a": 1}}, 400, "prompt", None),
        ({"model": MODEL_ID, "prompt": [99999999]}, 400, "prompt", None),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param and err["code"] == code


def test_bad_chat_and_unknown_route(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "wizard", "content": "hi"}])
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_disconnect_mid_stream_frees_the_sequence(server):
    body = {"model": MODEL_ID, "prompt": "And the king said", "max_tokens": 250, "stream": True, "temperature": 0,
            "repetition_penalty": 1.0}  # fmt: skip
    before = httpx.get(server.url + "/metrics").text
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert httpx.get(server.url + "/health").json()["running"] == 1
    t0 = time.monotonic()
    _wait_idle(server, timeout=5)
    freed_s = time.monotonic() - t0
    after = httpx.get(server.url + "/metrics").text

    key = 'moe_serve_requests_finished_total{reason="cancelled"}'
    assert _metric(after, key) == _metric(before, key) + 1
    assert freed_s < 5


def test_client_gone_before_a_non_streaming_answer_frees_the_sequence(server):
    body = {"model": MODEL_ID, "prompt": "And the king said", "max_tokens": 250, "temperature": 0,
            "repetition_penalty": 1.0}  # fmt: skip
    key = 'moe_serve_requests_finished_total{reason="cancelled"}'
    before = _metric(httpx.get(server.url + "/metrics").text, key)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    _wait_idle(server, timeout=3)  # the server notices within 0.5 s, long before 250 tokens
    assert _metric(httpx.get(server.url + "/metrics").text, key) == before + 1


def test_timeout_and_capacity(model_and_tok):
    model, tok = model_and_tok
    built = build(model=model, tokenizer=tok, served_model_name=MODEL_ID, max_seqs=1, max_queue=0, timeout=2.0)
    with ServerThread(built) as srv:
        body = {"model": MODEL_ID, "prompt": "And the king said", "max_tokens": 250, "repetition_penalty": 1.0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=30)
            deadline = time.monotonic() + 5
            while httpx.get(srv.url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # wait until the first request holds the only slot
            busy = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_overloaded"
            r = slow.result()
        assert r.status_code == 408 and "timeout" in r.json()["error"]["message"]
        _wait_idle(srv)
    assert not built.owns_model and not model.engine.closed  # the server did not close a model it was given


def test_schedulers():
    a = frozenset({(0, 1), (1, 3)})
    seqs = [SeqView(1, 0, 0, a), SeqView(2, 1, 0, frozenset({(0, 5), (1, 6)})), SeqView(3, 2, 0, a)]
    assert choose("expert_aware", seqs, cap=2, resident=frozenset(), max_wait=4) == [1, 3]
    assert choose("fcfs", seqs, cap=2, resident=frozenset(), max_wait=4) == [1, 2]
    # resident experts cost nothing: seq 2's experts are in the cache, seq 3's are not
    other = [SeqView(1, 0, 0, a), SeqView(3, 1, 0, frozenset({(0, 7), (1, 8)})), SeqView(2, 2, 0, frozenset({(0, 5), (1, 6)}))]
    assert choose("expert_aware", other, cap=2, resident=frozenset({(0, 5), (1, 6)}), max_wait=4) == [1, 2]
    assert choose("fcfs", other, cap=2, resident=frozenset({(0, 5), (1, 6)}), max_wait=4) == [1, 3]
    # bounded lag: sequences max_wait or more tokens behind their fair share go first, whatever their
    # experts; below the bound only the most behind one is taken (as the anchor), the rest by experts
    x, y = frozenset({(0, 1)}), frozenset({(0, 2)})
    behind = [SeqView(1, 0, 0, x, lag=2.5), SeqView(2, 1, 0, y, lag=2.0), SeqView(3, 2, 0, x, lag=-1.0)]
    assert choose("expert_aware", behind, cap=2, resident=frozenset(), max_wait=2) == [1, 2]
    assert choose("expert_aware", behind, cap=2, resident=frozenset(), max_wait=3) == [1, 3]
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        choose("random", seqs, cap=2, resident=frozenset(), max_wait=4)
    with pytest.raises(ValueError, match="step cap must be at least 1"):
        choose("expert_aware", seqs, cap=0, resident=frozenset(), max_wait=4)


def _serve_offline(policy: str, routes: list[list[frozenset]], cap: int, max_wait: int) -> tuple[float, float, int]:
    """Decode every sequence of ``routes`` (per sequence, per token: its experts) to the end, choosing
    each step with ``policy`` and the true next experts as the prediction; returns (mean distinct
    experts per step, largest lag, steps)."""
    pos = [0] * len(routes)
    lag = [0.0] * len(routes)
    waited = [0] * len(routes)
    distinct, steps, worst = 0, 0, 0.0
    while any(p < len(r) for p, r in zip(pos, routes, strict=True)):
        ready = [i for i, r in enumerate(routes) if pos[i] < len(r)]
        views = [SeqView(i, i, waited[i], routes[i][pos[i]], lag[i]) for i in ready]
        chosen = choose(policy, views, cap=cap, resident=frozenset(), max_wait=max_wait)
        assert len(chosen) == min(cap, len(ready)) and len(set(chosen)) == len(chosen)
        assert sum(next_lag(lag[i], len(ready), cap, i in chosen) for i in ready) == pytest.approx(sum(lag[i] for i in ready))
        distinct += len(frozenset().union(*(routes[i][pos[i]] for i in chosen)))
        for i in ready:
            lag[i] = next_lag(lag[i], len(ready), cap, i in chosen)
            waited[i] = 0 if i in chosen else waited[i] + 1
            worst = max(worst, lag[i])
        for i in chosen:
            pos[i] += 1
        steps += 1
    return distinct / steps, worst, steps


def test_expert_aware_groups_by_experts_within_the_lag_bound():
    """16 sequences from 4 topics (a topic's tokens use 2 of 4 topic experts per layer): grouping by
    predicted experts touches far fewer distinct experts per step than round robin, no sequence falls
    more than max_wait + 1 tokens behind its fair share, and the same number of steps serves everyone."""
    import random

    rng = random.Random(0)
    routes = []
    for i in range(16):
        topic = i % 4
        n = rng.randint(20, 40)
        routes.append([frozenset((layer, 4 * topic + e) for layer in range(4) for e in rng.sample(range(4), 2))
                       for _ in range(n)])  # fmt: skip
    fcfs_distinct, fcfs_lag, fcfs_steps = _serve_offline("fcfs", routes, cap=4, max_wait=2)
    aware_distinct, aware_lag, aware_steps = _serve_offline("expert_aware", routes, cap=4, max_wait=2)
    assert aware_distinct <= 0.6 * fcfs_distinct, (aware_distinct, fcfs_distinct)
    assert aware_lag <= 2 + 1, aware_lag
    assert aware_steps <= fcfs_steps + 1


def test_token_routes():
    table = TokenRoutes(max_tokens=2)
    assert table.predict(7, frozenset({(0, 1)})) == {(0, 1)}  # never seen: the fallback
    assert table.predict(None, frozenset()) == frozenset()
    table.record(7, [(0, (3, 5)), (1, (2, 9))])
    assert table.predict(7, frozenset({(0, 1)})) == {(0, 3), (0, 5), (1, 2), (1, 9)}
    table.record(7, [(0, (4, 5)), (1, (2, 9))])  # the latest routing wins
    assert table.predict(7, frozenset()) == {(0, 4), (0, 5), (1, 2), (1, 9)}
    table.record(8, [(0, (1, 2))])
    table.record(9, [(0, (1, 2))])  # a third id: the least recently recorded (7) is dropped
    assert len(table) == 2 and table.predict(7, frozenset()) == frozenset()
    with pytest.raises(ValueError, match="at least one token id"):
        TokenRoutes(max_tokens=0)


def test_batcher_records_each_real_tokens_route(model_and_tok):
    """Two prompts of different lengths prefill in one padded forward: the batcher's token table holds
    each prompt token's routing, equal to a forward of that prompt alone, and no pad's."""
    from moe_engine.runtime.engine import OffloadedExperts
    from moe_engine.serve.batcher import Batcher, BatcherConfig, SamplingParams

    model, tok = model_and_tok
    prompts = [tok("And the king said unto")["input_ids"], tok("Thus saith the Lord")["input_ids"]]
    assert len(prompts[0]) != len(prompts[1]) and 0 not in prompts[0] + prompts[1]
    batcher = Batcher(model, BatcherConfig(max_seqs=4, step_seqs=4, prefill_chunk=128), pad_token_id=0)
    done = []
    for p in prompts:  # both queued before the engine thread starts: one prefill forward for both
        batcher.submit(p, SamplingParams(max_new_tokens=1), sink=lambda e: done.append(e) if e.finish_reason else None)
    batcher.start()
    batcher.stop(drain=True, timeout=60)
    assert [e.finish_reason for e in done] == ["length", "length"]
    assert batcher.metrics.prefill_forwards == 1
    alone: dict[int, frozenset] = {}
    seen: dict[int, int] = {}
    for p in prompts:
        for t in p:
            seen[t] = seen.get(t, 0) + 1
        routes: dict[int, torch.Tensor] = {}

        def record(module, args, routes=routes):
            routes[module.moe_index] = args[1]

        hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, OffloadedExperts)]
        try:
            with torch.inference_mode():
                model(torch.tensor([p]))
        finally:
            for h in hooks:
                h.remove()
        for j, t in enumerate(p):
            alone[t] = frozenset((layer, int(e)) for layer, idx in routes.items() for e in idx[j].tolist())
    table = batcher._token_routes
    assert len(table) == len(seen)  # every real token, no pad (id 0)
    assert table.predict(0, frozenset()) == frozenset()
    for t, n in seen.items():
        if n == 1:  # a token in both prompts holds whichever row came last
            assert table.predict(t, frozenset()) == alone[t]
            assert len(alone[t]) == 8 * 2 and {layer for layer, _ in alone[t]} == set(range(8))


def test_held_batch_joins_and_leaves_equal_generate_alone(model_and_tok, stock_model):
    """Decode forwards of an unchanged batch go on with the held cache; sequences that finish early,
    join late (while others decode) or have prompts of other lengths change the rows, and the held
    columns go back into the sequences' own caches. Every greedy answer equals stock ``generate()``
    for its prompt alone, and both paths ran (held forwards and rebuilds)."""
    from moe_engine.serve.batcher import Batcher, BatcherConfig, SamplingParams

    model, tok = model_and_tok
    texts = ["And the king said unto", "Thus saith the Lord", "O Romeo", "Then came David into the city, and"]
    prompts = [tok(t)["input_ids"] for t in texts]
    budgets = [12, 5, 9, 7]  # the second leaves first; the last two join while the first two decode
    batcher = Batcher(model, BatcherConfig(max_seqs=8, prefill_chunk=128), pad_token_id=EOS)
    penalty = stock_model.generation_config.repetition_penalty  # generate() applies it: so does the server
    assert penalty != 1.0  # the default model sets one (1.3): the test covers it

    def params(i):
        return SamplingParams(max_new_tokens=budgets[i], repetition_penalty=penalty, stop_token_ids=frozenset({EOS}))

    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = concurrent.futures.Future()

    def sink(i):
        def on(ev):
            if ev.token is not None:
                out[i].append(ev.token)
            if ev.finish_reason:
                assert ev.finish_reason in ("length", "stop"), ev.error
                if all(len(out[j]) for j in out) and i == 0:
                    finished.set_result(True)
            if i == 0 and len(out[0]) == 3:  # late joiners: the first two are mid-decode now
                for j in (2, 3):
                    batcher.submit(prompts[j], params(j), sink(j))
        return on

    for i in (0, 1):
        batcher.submit(prompts[i], params(i), sink(i))
    batcher.start()
    try:
        finished.result(timeout=120)
    finally:
        batcher.stop(drain=True, timeout=120)
    assert batcher.metrics.held_forwards > 0 and batcher.metrics.decode_steps > batcher.metrics.held_forwards
    assert batcher._held is None  # nothing decoding: the held batch's cache is freed
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            ref = stock_model.generate(torch.tensor([ids]), max_new_tokens=budgets[i], do_sample=False,
                                       pad_token_id=EOS)[0, len(ids) :].tolist()  # fmt: skip
        if EOS in ref:
            ref = ref[: ref.index(EOS) + 1]
        assert out[i] == ref[: len(out[i])] and len(out[i]) == len(ref), (i, out[i], ref)


def test_failed_reads_mid_decode_end_those_requests_and_later_ones_are_exact(model_and_tok, stock_model, monkeypatch):
    """Expert reads fail (EIO, injected into the real store) while a batch decodes with its held cache:
    its requests end with an error event, the held batch is dropped, and requests after the fault
    clears get exactly ``generate()``'s answer for their prompt alone."""
    import errno

    from moe_engine.serve.batcher import Batcher, BatcherConfig, SamplingParams

    model, tok = model_and_tok
    store = model.engine.store
    real = store.read_expert_into
    failing = threading.Event()

    def flaky(loc, slot):
        if failing.is_set():
            raise OSError(errno.EIO, "injected read error")
        return real(loc, slot)

    monkeypatch.setattr(store, "read_expert_into", flaky)
    penalty = stock_model.generation_config.repetition_penalty
    params = SamplingParams(max_new_tokens=24, repetition_penalty=penalty, stop_token_ids=frozenset({EOS}))
    batcher = Batcher(model, BatcherConfig(max_seqs=8, prefill_chunk=128), pad_token_id=EOS)
    ended: dict[int, concurrent.futures.Future] = {}

    def submit(text, on_token=None):
        done = concurrent.futures.Future()
        tokens: list[int] = []

        def sink(ev):
            if ev.token is not None:
                tokens.append(ev.token)
                if on_token is not None:
                    on_token(len(tokens))
            if ev.finish_reason:
                done.set_result((ev.finish_reason, tokens))

        ended[batcher.submit(tok(text)["input_ids"], params, sink)] = done
        return done

    def fail_after_4(n):
        if n == 4 and batcher.metrics.held_forwards > 0:
            failing.set()

    batcher.start()
    try:
        first = [submit("And the king said unto", fail_after_4), submit("O Romeo")]
        for f in first:
            reason, _ = f.result(timeout=120)
            assert reason == "error"
        assert batcher._held is None
        failing.clear()
        later = {t: submit(t) for t in ("Thus saith the Lord", "Then came David into the city, and")}
        for text, f in later.items():
            reason, got = f.result(timeout=120)
            ids = tok(text)["input_ids"]
            with torch.inference_mode():
                ref = stock_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                           pad_token_id=EOS)[0, len(ids) :].tolist()  # fmt: skip
            if EOS in ref:
                ref = ref[: ref.index(EOS) + 1]
            assert reason in ("length", "stop") and got == ref, (text, got, ref)
    finally:
        failing.clear()
        batcher.stop(drain=True, timeout=120)


def test_simple_chat_template_documented():
    assert "Assistant:" in SIMPLE_CHAT_TEMPLATE


@pytest.mark.slow  # a subprocess that imports torch and loads the model: about 15 s on a 2-core machine
def test_sigterm_drains_in_flight_stream():
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(port), "--threads", "1",
         "--log-level", "warning", "--dtype", "float32"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)  # polling for the server to listen
        body = {"model": MODEL_ID, "prompt": "And the king said", "max_tokens": 40, "stream": True,
                "temperature": 0}  # fmt: skip
        chunks = []
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if len(chunks) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert chunks[-1] == "[DONE]"
        assert json.loads(chunks[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

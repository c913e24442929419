"""The server under load: batching throughput, expert-aware vs FCFS scheduling, exactness, a load test.

Every part runs ``moe-engine serve`` (the embedded default model, 25 % expert budget, ``--threads``
torch threads, default 1; ``--dtype``, default float32) as a subprocess on a free loopback port; the clients (httpx, and the
``openai`` package for the exactness part) run in this process on asyncio. Parts:

1. exactness: the server in fp32; ``--concurrency-exact`` (32) concurrent streaming chat requests with
   the ``openai`` client, greedy; each answer must equal stock transformers' ``generate()`` for that
   prompt alone (the engine's own ``generate()`` equals stock's bit for bit).
2. throughput: total output tokens/s of 16 concurrent clients (one request each) against the same
   requests sent one at a time, same server, ``--throughput-rounds`` (3) rounds interleaved; the figure is
   the median of the rounds' ratios. Bar: >= 4x.
3. scheduling: ``--sched-clients`` clients each send ``--sched-requests`` requests back to back, to
   a server with ``--step-seqs`` sequences per decode step, ``--eviction`` policy and ``--predictor``, once with
   ``--schedule expert_aware`` and once with ``fcfs`` (``--repeats`` rounds, interleaved): expert bytes moved per output token (from
   the server's /metrics) and p95 request latency. Bars: bytes <= 0.8x FCFS's, p95 <= 1.2x. The baseline is
   fair: both policies run the same server flags (budget, eviction policy, prefetch predictor, step cap,
   ``--max-seqs``), the same clients and prompts; only ``--schedule`` differs.
4. load test: 500 requests at 64-way concurrency, 10 % of the clients disconnect mid-stream, 5 % send
   malformed requests, ``--load-rounds`` (2) times: every well-formed request must be answered (200 with a
   finish_reason), every malformed one must get a 4xx, none may hang, the server idle again after each
   round; server RSS before and after each round, flat (within 32 MiB) after the first round.

Writes JSON to ``--out`` (default ``~/.cache/moe-engine/bench/serve_eval.json``), merged into what the file
already holds: each part run replaces its own key (``--save-as`` names the key of a single part, e.g. a
variant of the scheduling part) and records the command that produced it; other keys are kept.

Example::

    python -m moe_engine.benchmarks.serve_eval --out benchmarks/results/serve_eval.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL_ID = "moe-engine-default"
NAMES = ["Romeo", "Juliet", "Moses", "David", "Hamlet", "Ophelia", "Samuel", "Lear", "Portia", "Aaron", "Caesar",
         "Brutus", "Isaac", "Jacob", "Esther", "Ruth", "Macbeth", "Banquo", "Noah", "Abraham", "Othello", "Iago",
         "Miranda", "Prospero", "Saul", "Solomon", "Paul", "Peter", "Falstaff", "Hal", "Cordelia", "Edmund"]  # fmt: skip
OPENINGS = ["And {} said unto the people,", "Then came {} into the city, and", "O {}, what light is this",
            "Now {} went up to the house of the Lord", "Speak, {}, for thy servant heareth:",
            "Thus saith {} unto the king:", "Where art thou, {}? The night is"]  # fmt: skip


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(OPENINGS).format(rng.choice(NAMES)) for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``moe-engine serve`` in a subprocess."""

    def __init__(self, *extra: str, threads: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(self.port), "--threads", str(threads),
               "--log-level", "warning", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moe-engine serve exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moe-engine serve did not start within 180 s")
            time.sleep(0.2)  # polling for the server to listen

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def _complete(client, url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0})  # fmt: skip
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"]), time.perf_counter() - t0


async def _run_clients(url: str, per_client: list[list[str]], max_tokens: int) -> dict:
    """Each client sends its prompts one after another; all clients at once."""
    import httpx

    latencies: list[float] = []
    tokens = 0

    async def client_task(client, items):
        nonlocal tokens
        for p in items:
            n, dt = await _complete(client, url, p, max_tokens)
            tokens += n
            latencies.append(dt)

    limits = httpx.Limits(max_connections=len(per_client) + 8, max_keepalive_connections=len(per_client) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_task(client, items) for items in per_client))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "requests": len(lat),
            "p50_s": lat[len(lat) // 2], "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}  # fmt: skip


# ---------------------------------------------------------------------------- parts
def part_exactness(args) -> dict:
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_engine.default_model import default_model_path
    from moe_engine.serve.app import render_chat

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    n, max_tokens = args.concurrency_exact, args.exact_tokens
    chats = [[{"role": "user", "content": p}] for p in prompts(n, seed=1)]
    srv = Server("--dtype", "float32", "--max-seqs", str(max(32, n)), threads=args.threads)
    try:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)

        async def ask(msgs):
            stream = await client.chat.completions.create(model=MODEL_ID, messages=msgs, stream=True, temperature=0,
                                                          max_tokens=max_tokens)  # fmt: skip
            text = ""
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
            return text

        async def everyone():
            return await asyncio.gather(*(ask(m) for m in chats))

        t0 = time.perf_counter()
        answers = asyncio.run(everyone())
        wall = time.perf_counter() - t0
    finally:
        srv.stop()
    torch.set_num_threads(args.threads)
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    equal = 0
    for msgs, text in zip(chats, answers, strict=True):
        ids = render_chat(tok, msgs)
        with torch.inference_mode():
            out = stock.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        new = out[0, len(ids) :].tolist()
        new = new[: new.index(0)] if 0 in new else new
        equal += text == tok.decode(new, skip_special_tokens=True)
    return {"requests": n, "max_tokens": max_tokens, "completed": len(answers), "equal_to_generate_alone": equal,
            "wall_s": wall, "pass": equal == n}  # fmt: skip


def part_throughput(args) -> dict:
    srv = Server("--max-seqs", "32", "--dtype", args.dtype, threads=args.threads)
    rounds = []
    try:
        warm = prompts(2, seed=9)
        asyncio.run(_run_clients(srv.url, [warm], 8))
        ps = prompts(args.clients, seed=2)
        for r in range(args.throughput_rounds):  # interleaved: a slow spell of the shared cores hits both
            seq = asyncio.run(_run_clients(srv.url, [ps], args.max_tokens))  # one client: one request at a time
            conc = asyncio.run(_run_clients(srv.url, [[p] for p in ps], args.max_tokens))
            rounds.append({"one_at_a_time": seq, "concurrent": conc, "ratio": conc["tok_s"] / seq["tok_s"]})
            print(f"  round {r + 1}: one at a time {seq['tok_s']:6.1f} tok/s, {args.clients} concurrent "
                  f"{conc['tok_s']:6.1f} tok/s, ratio {rounds[-1]['ratio']:.2f}x", flush=True)  # fmt: skip
    finally:
        srv.stop()
    ratio = statistics.median(r["ratio"] for r in rounds)
    return {"comparison": "same server, same prompts; rounds interleaved (one at a time, then concurrent); the "
            "figure is the median of the rounds' ratios",
            "clients": args.clients, "max_tokens": args.max_tokens, "rounds": rounds,
            "one_at_a_time_tok_s": statistics.median(r["one_at_a_time"]["tok_s"] for r in rounds),
            "concurrent_tok_s": statistics.median(r["concurrent"]["tok_s"] for r in rounds),
            "ratio": ratio, "bar": 4.0, "pass": ratio >= 4.0}  # fmt: skip


def part_scheduling(args) -> dict:
    rounds: dict[str, list[dict]] = {"expert_aware": [], "fcfs": []}
    per_client = [prompts(args.sched_requests, seed=100 + c) for c in range(args.sched_clients)]
    for r in range(args.repeats):
        for policy in ("expert_aware", "fcfs"):
            srv = Server("--max-seqs", "64", "--dtype", args.dtype, "--policy", args.eviction, "--predictor", args.predictor,
                         "--step-seqs", str(args.step_seqs), "--schedule", policy,
                         "--max-wait", str(args.max_wait), threads=args.threads)  # fmt: skip
            try:
                asyncio.run(_run_clients(srv.url, [prompts(2, seed=9)], 8))  # warm up
                before = srv.metrics()
                res = asyncio.run(_run_clients(srv.url, per_client, args.max_tokens))
                after = srv.metrics()
            finally:
                srv.stop()
            moved = after["moe_serve_expert_bytes_moved_total"] - before["moe_serve_expert_bytes_moved_total"]
            key_steps = f'moe_serve_decode_steps_total{{policy="{policy}"}}'
            key_seqs = f'moe_serve_step_sequences_total{{policy="{policy}"}}'
            key_exp = f'moe_serve_step_distinct_experts_total{{policy="{policy}"}}'
            steps = after[key_steps] - before[key_steps]
            res.update(bytes_moved=moved, bytes_per_token=moved / res["tokens"], decode_steps=steps,
                       seqs_per_step=(after[key_seqs] - before[key_seqs]) / steps,
                       predicted_experts_per_step=(after[key_exp] - before[key_exp]) / steps)  # fmt: skip
            rounds[policy].append(res)
            print(f"  round {r + 1} {policy:12} {res['bytes_per_token'] / 1024:8.1f} KiB/token  p95 "
                  f"{res['p95_s']:6.2f} s  {res['tok_s']:6.1f} tok/s  {res['seqs_per_step']:.1f} seqs/step",
                  flush=True)  # fmt: skip
    med = {p: {k: statistics.median(x[k] for x in rs) for k in ("bytes_per_token", "p95_s", "tok_s")}
           for p, rs in rounds.items()}  # fmt: skip
    bytes_ratio = med["expert_aware"]["bytes_per_token"] / med["fcfs"]["bytes_per_token"]
    p95_ratio = med["expert_aware"]["p95_s"] / med["fcfs"]["p95_s"]
    return {"comparison": "same run, rounds interleaved; both policies: same budget (25 %), eviction policy, "
            "prefetch predictor, step cap (--step-seqs) and --max-seqs 64, same clients and prompts; only --schedule "
            "differs",
            "tok_s_ratio": med["expert_aware"]["tok_s"] / med["fcfs"]["tok_s"],
            "clients": args.sched_clients, "requests_per_client": args.sched_requests, "step_seqs": args.step_seqs,
            "eviction": args.eviction, "predictor": args.predictor,
            "max_wait": args.max_wait, "max_tokens": args.max_tokens, "rounds": rounds, "median": med,
            "bytes_per_token_ratio": bytes_ratio, "p95_ratio": p95_ratio, "bars": {"bytes": 0.8, "p95": 1.2},
            "pass": bytes_ratio <= 0.8 and p95_ratio <= 1.2}  # fmt: skip


def part_prediction(args) -> dict:
    """How well the scheduler's expert prediction recalls the experts a decode step really uses.

    Routing recorded in-process (the engine at a 100 % budget, greedy ``generate()`` with the model's
    generation config) for the scheduling part's prompts, replayed in serving order (request waves,
    position-major within a wave): for each generated token fed back, the share of its (layer, expert)
    pairs predicted by (a) the sequence's own previous token's routing, (b) ``TokenRoutes`` (the routing
    last seen for that token id anywhere, prompt or generated; (a) for an id not seen yet)."""
    import torch
    from transformers import AutoTokenizer

    import moe_engine
    from moe_engine.runtime.engine import OffloadedExperts
    from moe_engine.serve.scheduler import TokenRoutes

    torch.set_num_threads(args.threads)
    path = moe_engine.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    per_client = [prompts(args.sched_requests, seed=100 + c) for c in range(args.sched_clients)]
    recorded: dict[int, list[torch.Tensor]] = {}

    def record(module, inputs) -> None:
        recorded.setdefault(module.moe_index, []).append(inputs[1].clone())

    requests = []  # (wave, ids [prompt + fed generated], routes per fed token [(layer, experts)...], prompt length)
    with moe_engine.from_pretrained(path, budget=1.0, device="cpu", dtype=args.dtype, predictor=None) as model:
        for m in model.modules():
            if isinstance(m, OffloadedExperts):
                m.register_forward_pre_hook(record)
        top_k = 0
        for items in per_client:
            for w, text in enumerate(items):
                recorded.clear()
                ids = tok(text, return_tensors="pt").input_ids
                with torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
                layers = sorted(recorded)
                per_layer = [torch.cat(recorded[layer]).tolist() for layer in layers]  # [L][fed tokens][k]
                fed = out[0, : len(per_layer[0])].tolist()
                routes = [[(layer, per_layer[i][t]) for i, layer in enumerate(layers)] for t in range(len(fed))]
                requests.append((w, fed, routes, ids.shape[1]))
                top_k = len(per_layer[0][0])
        n_experts = model.config.num_experts
    events = sorted(((w, t, r) for r, (w, _, _, _) in enumerate(requests) for t in range(len(requests[r][1]))))
    table = TokenRoutes()
    own = [frozenset() for _ in requests]
    hits = {"previous_token": 0, "token_routes": 0}
    total, covered = 0, 0
    for _, t, r in events:
        _, fed, routes, plen = requests[r]
        actual = frozenset((layer, e) for layer, experts in routes[t] for e in experts)
        if t >= plen:  # a generated token fed back: a decode step the scheduler predicts
            total += len(actual)
            hits["previous_token"] += len(actual & own[r])
            predicted = table.predict(fed[t], own[r])
            covered += predicted is not own[r]
            hits["token_routes"] += len(actual & predicted)
        table.record(fed[t], routes[t])
        own[r] = actual
    decode_tokens = sum(len(fed) - plen for _, fed, _, plen in requests)
    return {"requests": len(requests), "decode_tokens": decode_tokens, "top_k": top_k, "experts": n_experts,
            "recall": {k: v / total for k, v in hits.items()}, "chance": top_k / n_experts,
            "token_routes_coverage": covered / decode_tokens}  # fmt: skip


def part_load(args) -> dict:
    import httpx

    n, conc = args.load_requests, args.load_concurrency
    rng = random.Random(7)
    kinds = ["disconnect"] * (n // 10) + ["malformed"] * (n // 20)
    kinds += ["stream" if i % 2 else "plain" for i in range(n - len(kinds))]
    rng.shuffle(kinds)
    bad_bodies = [b"{oops", json.dumps({"model": "nope", "prompt": "hi"}).encode(),
                  json.dumps({"model": MODEL_ID, "prompt": "hi", "max_tokens": -3}).encode(),
                  json.dumps({"model": MODEL_ID, "messages": "hi"}).encode(),
                  json.dumps({"model": MODEL_ID, "prompt": "hi", "temperature": "hot"}).encode()]  # fmt: skip
    srv = Server("--max-seqs", "32", "--dtype", args.dtype, "--timeout", "300", threads=args.threads)
    outcome: dict[str, int] = {}
    try:
        asyncio.run(_run_clients(srv.url, [prompts(4, seed=9)], 16))  # warm up
        rss_before = srv.rss_bytes()
        async def one(client, sem, i: int, kind: str) -> str:
            async with sem:
                prompt = prompts(1, seed=1000 + i)[0]
                max_tokens = rng.randint(8, args.load_max_tokens)
                try:
                    if kind == "malformed":
                        body = bad_bodies[i % len(bad_bodies)]
                        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
                        r = await client.post(srv.url + path, content=body, headers={"content-type": "application/json"})
                        return "malformed_4xx" if 400 <= r.status_code < 500 and "error" in r.json() else "malformed_wrong"
                    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                    if kind == "plain":
                        r = await client.post(srv.url + "/v1/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                        return "answered" if ok else f"failed_{r.status_code}"
                    body.update(stream=True, max_tokens=max(max_tokens, 24))
                    async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            return f"failed_{r.status_code}"
                        seen, finish = 0, None
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            seen += 1
                            if kind == "disconnect" and seen == 2:
                                return "disconnected"  # leaving the block closes the connection mid-stream
                            finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
                        return "answered" if finish in ("stop", "length") else "stream_incomplete"
                except (httpx.TimeoutException, asyncio.TimeoutError):
                    return "hung"

        async def everyone():
            limits = httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8)
            sem = asyncio.Semaphore(conc)  # made inside the round's event loop
            async with httpx.AsyncClient(timeout=args.load_client_timeout, limits=limits) as client:
                return await asyncio.gather(*(one(client, sem, i, k) for i, k in enumerate(kinds)))

        rss_rounds, walls = [], []
        for _ in range(args.load_rounds):
            t0 = time.perf_counter()
            results = asyncio.run(everyone())
            walls.append(time.perf_counter() - t0)
            for res in results:
                outcome[res] = outcome.get(res, 0) + 1
            deadline = time.monotonic() + 30
            while True:
                health = srv.health()
                if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # polling until the server has freed every sequence
            rss_rounds.append(srv.rss_bytes())
            print(f"  load round: {walls[-1]:.0f} s, {outcome}, RSS {rss_rounds[-1] / 2**20:.0f} MiB", flush=True)
        rss_after = rss_rounds[-1]
        wall = sum(walls)
        m = srv.metrics()
    finally:
        code = srv.stop()
    rounds = args.load_rounds
    well_formed = rounds * sum(1 for k in kinds if k in ("plain", "stream"))
    malformed = rounds * kinds.count("malformed")
    # Flat: after the first round (KV buffers, allocator arenas and caches at their high-water mark),
    # further rounds add at most this much.
    allowance = 32 * 2**20
    flat = len(rss_rounds) < 2 or rss_rounds[-1] - rss_rounds[0] <= allowance
    return {"requests": n, "concurrency": conc, "kinds": {k: kinds.count(k) for k in set(kinds)}, "outcome": outcome,
            "wall_s": wall, "well_formed": well_formed, "answered": outcome.get("answered", 0),
            "hung": outcome.get("hung", 0), "idle_after": health, "rss_before": rss_before, "rss_after": rss_after,
            "rss_growth": rss_after - rss_before, "rss_after_each_round": rss_rounds,
            "rss_growth_after_first_round": rss_after - rss_rounds[0], "rss_allowance_after_first_round": allowance,
            "rounds": rounds, "wall_per_round_s": walls,
            "cancelled_in_engine": m.get('moe_serve_requests_finished_total{reason="cancelled"}', 0),
            "exit_code_after_sigterm": code,
            "pass": outcome.get("answered", 0) == well_formed and outcome.get("malformed_4xx", 0) == malformed
            and outcome.get("hung", 0) == 0 and health["running"] == 0 and flat}  # fmt: skip


PARTS = {"exactness": part_exactness, "throughput": part_throughput, "prediction": part_prediction,
         "scheduling": part_scheduling, "load": part_load}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--dtype", default="float32",
                   help="server compute dtype (default float32: CPU bf16 matmuls gain little from batching)")  # fmt: skip
    p.add_argument("--clients", type=int, default=16, help="throughput: concurrent clients (default 16)")
    p.add_argument("--throughput-rounds", type=int, default=3,
                   help="throughput: rounds, each one-at-a-time then concurrent; the median ratio is reported (default 3)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens per request (default 48)")
    p.add_argument("--concurrency-exact", type=int, default=32, help="exactness: concurrent requests (default 32)")
    p.add_argument("--exact-tokens", type=int, default=24, help="exactness: max_tokens (default 24)")
    p.add_argument("--sched-clients", type=int, default=16, help="scheduling: clients (default 16)")
    p.add_argument("--sched-requests", type=int, default=3, help="scheduling: requests per client (default 3)")
    p.add_argument("--step-seqs", type=int, default=4, help="scheduling: sequences per decode step (default 4)")
    p.add_argument("--max-wait", type=int, default=2, help="scheduling: expert_aware's waiting bound (default 2)")
    p.add_argument("--predictor", default="none",
                   help="scheduling: the server's prefetch predictor (default none: prefetches into an LRU cache "
                   "evict the step group's experts)")  # fmt: skip
    p.add_argument("--eviction", default="lru",
                   help="scheduling: the server's eviction policy (default lru: grouping pays through recency; "
                   "with auto, which starts as LFU, the measured gain is nil)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="scheduling: rounds per policy, interleaved (default 2)")
    p.add_argument("--load-requests", type=int, default=500, help="load test: requests (default 500)")
    p.add_argument("--load-concurrency", type=int, default=64, help="load test: concurrency (default 64)")
    p.add_argument("--load-max-tokens", type=int, default=32, help="load test: largest max_tokens (default 32)")
    p.add_argument("--load-rounds", type=int, default=2,
                   help="load test: rounds of --load-requests; RSS must stay flat after the first (default 2)")  # fmt: skip
    p.add_argument("--load-client-timeout", type=float, default=300, help="load test: a request slower hangs (default 300 s)")
    p.add_argument("--out", default=str(Path.home() / ".cache/moe-engine/bench/serve_eval.json"),
                   help="JSON output; parts already in the file and not run now are kept")  # fmt: skip
    p.add_argument("--save-as", default=None,
                   help="store the (single) part under this key instead of its name, e.g. scheduling_with_prefetch")  # fmt: skip
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.save_as is not None and len(parts) != 1:
        p.error(f"--save-as names the key of one part; got --parts {','.join(parts)}")
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if out.exists():
        try:
            result = json.loads(out.read_text())
        except json.JSONDecodeError as exc:
            p.error(f"{out} is not valid JSON ({exc}); move it away or choose another --out")
    result.pop("args", None)  # older files: one run's arguments for every part; now each part keeps its command
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "server_threads": args.threads}
    command = " ".join(["python -m moe_engine.benchmarks.serve_eval", *(argv if argv is not None else sys.argv[1:])])
    for name in parts:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        key = args.save_as or name
        result[key] = PARTS[name](args)
        result[key]["part_seconds"] = time.perf_counter() - t0
        result[key]["command"] = command
        result[key]["date"] = time.strftime("%Y-%m-%d", time.gmtime())
        print(json.dumps({k: v for k, v in result[key].items() if k != "rounds"}, indent=1, default=str), flush=True)
        out.write_text(json.dumps(result, indent=1, default=str))  # after each part: a partial run keeps its figures
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

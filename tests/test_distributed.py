"""Expert parallelism (``moe_engine.distributed``) with real gloo process groups on this machine.

One process group per world size runs every job (architecture x mode x plan) in turn, so the ranks'
start-up is paid once; the parent compares each job with the single-process engine on the same inputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_same_trace, decode_trace
from moe_engine.placement.plan import (
    PlacementPlan,
    Replica,
    load_plan,
    round_robin_plan,
    save_plan,
    token_devices,
)

import moe_engine
from moe_engine.distributed import PlanMismatchError, attach, check_plan
from moe_engine.distributed.launch import free_port

STEPS = 2  # decode steps per job (prefill + 2 steps, then generate: prefill + 1 step)
FORWARDS = 1 + STEPS + STEPS
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_step2", "olmoe", "deepseek_v2", "deepseek_v3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@dataclass(frozen=True)
class Job:
    name: str
    path: str
    mode: str
    plan: str | None  # plan file, None = round-robin
    budget: float = 1.0
    regroup: bool = False


def replicated_plan(num_layers: int, num_experts: int, world: int) -> PlacementPlan:
    """A layout unlike round-robin, with replicas: expert 0 on every rank at every layer (route: each
    rank uses its own copy, so its tokens split across the copies by source), expert 1 on two ranks."""
    experts = (np.arange(num_experts)[None, :] + np.arange(num_layers)[:, None]) % world
    replicas: dict[int, dict[int, Replica]] = {}
    for layer in range(num_layers):
        p0 = int(experts[layer, 0])
        all_devs = (p0, *[g for g in range(world) if g != p0])
        reps = {0: Replica(all_devs, tuple(range(world)))}
        p1 = int(experts[layer, 1])
        other = (p1 + 1) % world
        reps[1] = Replica((p1, other), tuple(p1 if g % 2 == 0 else other for g in range(world)))
        replicas[layer] = reps
    return PlacementPlan(experts=experts.astype(np.int64), num_devices=world, replicas=replicas)


def _worker(rank: int, world: int, port: int, jobs: list[Job], out_dir: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    for i, job in enumerate(jobs):
        if job.mode == "mismatch":
            try:
                moe_engine.from_pretrained(job.path, budget=1.0, predictor=None, device="cpu", plan=job.plan)
                msg = "no error"
            except PlanMismatchError as exc:
                msg = str(exc)
            if rank == 0:
                Path(out_dir, f"{i}.txt").write_text(msg)
            continue
        model = moe_engine.from_pretrained(job.path, budget=job.budget, predictor=None, device="cpu",
                                           dtype=torch.float32, plan=job.plan, ep_mode=job.mode)  # fmt: skip
        preloaded = sorted(model.engine.core.entries)  # the cold start: this rank's own experts only
        owned = model.expert_parallel.owned_experts()
        ep = attach(model, plan=job.plan, mode=job.mode, regroup=True) if job.regroup else model.expert_parallel
        ep.record()
        got = decode_trace(model, steps=STEPS)
        group = ep.gather_stats()
        if rank == 0:
            torch.save({"trace": got.__dict__, "group": group.to_json(), "routing": ep.recorded,
                        "preloaded": preloaded, "owned": owned}, Path(out_dir, f"{i}.pt"))  # fmt: skip
        model.close()
    dist.destroy_process_group()


def _run_group(world: int, jobs: list[Job], out_dir: Path) -> None:
    mp.start_processes(_worker, args=(world, free_port(), jobs, str(out_dir)), nprocs=world, start_method="spawn")


_REFS: dict[str, object] = {}  # single-process results, shared by both world sizes


def _single_process(path: str):
    if path in _REFS:
        return _REFS[path]
    with moe_engine.from_pretrained(path, budget=1.0, predictor=None, device="cpu", dtype=torch.float32) as model:
        _REFS[path] = decode_trace(model, steps=STEPS)
    return _REFS[path]


def _check_jobs(jobs: list[Job], out_dir: Path, world: int) -> None:
    refs: dict[str, object] = {}
    for i, job in enumerate(jobs):
        if job.mode == "mismatch":
            continue
        saved = torch.load(Path(out_dir, f"{i}.pt"), weights_only=False)
        if job.path not in refs:
            refs[job.path] = _single_process(job.path)
        got = type(refs[job.path])(**saved["trace"])
        assert_same_trace(got, refs[job.path], what=f"{job.name} ({world} ranks)")
        owned = saved["owned"]  # rank 0's experts per layer
        assert saved["preloaded"] and all(e in owned[layer] for layer, e in saved["preloaded"]), job.name
        assert {layer for layer, _ in saved["preloaded"]} == set(range(len(owned))), job.name  # every layer a share
        ranks = saved["group"]["ranks"]
        per_forward = 1 if job.mode == "coherent" else 2
        for s in ranks:  # every rank made exactly this many all-to-alls at every MoE layer
            assert s["a2a_calls"] == [per_forward * FORWARDS] * len(s["a2a_calls"]), (job.name, s["a2a_calls"])
        # tokens sent across ranks, counted on the wire, equal plan-eval's count on the same routing
        plan = load_plan(job.plan) if job.plan else round_robin_plan(len(ranks[0]["a2a_calls"]), _num_experts(job.path), world)
        want = 0
        offset = 0
        for ids in saved["routing"]:  # one [T, L, K] per forward; tokens numbered since load
            dev = token_devices(plan, ids, first_token=offset)
            want += int((dev[:, :-1, :, None] != dev[:, 1:, None, :]).sum())
            offset += ids.shape[0]
        assert saved["group"]["cross_pairs"] == want, (job.name, saved["group"]["cross_pairs"], want)


def _num_experts(path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise AssertionError(path)


def _layers(path: str) -> int:
    with moe_engine.from_pretrained(path, budget=1.0, predictor=None, device="cpu") as model:
        return len(model.engine.layers)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    paths = {arch: tiny_checkpoint(arch) for arch in ARCHS}
    paths["default"] = Path(moe_engine.default_model_path())
    return paths


def _plans(checkpoints: dict[str, Path], world: int, out: Path) -> dict[str, str]:
    plans = {}
    for name, path in checkpoints.items():
        plan = replicated_plan(_layers(str(path)), _num_experts(str(path)), world)
        plans[name] = str(out / f"{name}-{world}.json")
        save_plan(plan, plans[name])
    return plans


@pytest.mark.parametrize("world", [2, 4])
def test_every_architecture_matches_single_process(world, checkpoints, tmp_path):
    """Greedy tokens identical and fp32 logits within 1e-5 of the single-process engine, in both modes,
    round-robin and a replicated plan; all-to-alls per MoE layer per forward: 2 (standard), 1 (coherent);
    cross-rank token handoffs equal plan-eval's count on the same routing; a plan/model mismatch is refused."""
    plans = _plans(checkpoints, world, tmp_path)
    jobs = []
    for n, (name, path) in enumerate(sorted(checkpoints.items())):
        # 2 ranks: every architecture in both modes, round-robin for one and the replicated plan for the
        # other (alternating); 4 ranks (slower on 2 cores): every architecture in one mode, the four
        # (mode, layout) combinations in turn. Each world size covers every architecture and both layouts
        # in both modes.
        modes = ("standard", "coherent") if world == 2 else (("standard", "coherent")[n % 2],)
        for mode in modes:
            use_plan = (n + (mode == "coherent")) % 2 == 0 if world == 2 else (n // 2) % 2 == 0
            budget = 0.5 if (use_plan and name != "default") else 1.0  # each rank's own cache, half its experts
            jobs.append(Job(f"{name}/{mode}/{'plan' if use_plan else 'rr'}", str(path), mode,
                            plans[name] if use_plan else None, budget))  # fmt: skip
    # token regrouping (standard mode) moves tokens, never changes results
    jobs.append(Job("default/standard/plan/regroup", str(checkpoints["default"]), "standard", plans["default"], regroup=True))
    bad = replicated_plan(_layers(str(checkpoints["mixtral"])), _num_experts(str(checkpoints["mixtral"])), world + 1)
    save_plan(bad, tmp_path / "bad.json")
    jobs.append(Job("mismatch", str(checkpoints["mixtral"]), "mismatch", str(tmp_path / "bad.json")))
    _run_group(world, jobs, tmp_path)
    _check_jobs(jobs, tmp_path, world)
    msg = Path(tmp_path, f"{len(jobs) - 1}.txt").read_text()
    assert f"{world + 1} devices but the process group has {world} ranks" in msg and "moe-engine plan" in msg, msg
    assert {(j.mode, j.plan is None) for j in jobs[:-2]} == {(m, rr) for m in ("standard", "coherent") for rr in (True, False)}


def test_check_plan_names_every_mismatch():
    plan = round_robin_plan(3, 8, 2)
    check_plan(plan, num_layers=3, num_experts=8, world_size=2)
    with pytest.raises(PlanMismatchError, match=r"3 MoE layers but the model has 2; 8 experts per layer but the model has 6; 2 devices but the process group has 4 ranks"):
        check_plan(plan, num_layers=2, num_experts=6, world_size=4)


def _rank_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "moe_engine.distributed", "--quiet", "--dtype", "float32", *args]


def test_killed_rank_stops_the_others_with_a_clear_error(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(_rank_cmd(["--max-new-tokens", "900", "--timeout", "30"]), env=env,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        for p in procs:  # both ranks loaded and about to generate
            assert p.stderr is not None
            line = p.stderr.readline()
            while line and "ready" not in line:
                line = p.stderr.readline()
            assert "ready" in line, "rank did not start"
        time.sleep(1.0)  # let them get into the decode loop
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert waited < 60, waited
    print(f"surviving rank exited {waited:.1f} s after the kill")
    assert "another rank has died or stopped answering" in err, err[-2000:]


def test_two_node_torchrun_on_loopback_matches_single_process(tmp_path):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "moe_engine.distributed", "--quiet", "--dtype", "float32", "--max-new-tokens", "6",
               "--ep-mode", "coherent", "--stats-json", str(tmp_path / f"node{node}.json")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    import json

    got = json.loads((tmp_path / "node0.json").read_text())
    assert not (tmp_path / "node1.json").exists()  # only global rank 0 writes
    assert got["world_size"] == 2
    from transformers import AutoTokenizer

    from moe_engine.default_model import DEFAULT_PROMPT

    path = moe_engine.default_model_path()
    ids = AutoTokenizer.from_pretrained(path)(DEFAULT_PROMPT, return_tensors="pt").input_ids
    with moe_engine.from_pretrained(path, budget=1.0, predictor=None, device="cpu", dtype=torch.float32) as model:
        want = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    assert got["output_ids"] == want
    assert got["a2a_calls_per_token"] > 0

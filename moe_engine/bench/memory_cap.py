"""Kernel-enforced memory caps for ``moe-engine bench``'s children: one fresh memory cgroup per system run.

Owns: finding a usable cgroup (v1 or v2) and creating, joining, reading and removing one cgroup per run.

A cgroup's memory counter charges a process's anonymous memory *and* the page cache it reads or writes,
so a cgroup limit is the same cap for every system, whatever the system does with the OS page cache
(accelerate's offloaded weights are read through it; the engine drops its pages). When the charge
reaches the limit the kernel reclaims page cache inside the cgroup first, and OOM-kills the process
when nothing more can be reclaimed.

Both cgroup versions are supported: v1 (``/sys/fs/cgroup/memory``: ``memory.limit_in_bytes``,
``memory.max_usage_in_bytes``, ``memory.oom_control``, ``memory.failcnt``) and v2 (``memory.max``,
``memory.peak``, ``memory.events``). Creating cgroups needs root (or a delegated subtree).

Example::

    backend = detect_backend()          # None when cgroups cannot be used here
    with backend.create("run1", limit_bytes=2**30) as cg:
        proc = subprocess.Popen(cg.wrap(["python", "-c", "..."]))
        proc.wait()
        print(cg.peak_bytes(), cg.oom_kills())
"""

from __future__ import annotations

import itertools
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

_V1_ROOT = Path("/sys/fs/cgroup/memory")
_V2_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (``memory.oom_control``, ``memory.events``, ``memory.stat``) as a dict."""
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            pass
    return out


def _own_cgroup(controller: str | None) -> str:
    """This process's cgroup path for a v1 ``controller``, or its v2 path (``controller=None``)."""
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            return path
    return "/"


@dataclass
class MemoryCgroup:
    """One child cgroup: its folder, cgroup version and limit (``None``: accounting only, no limit)."""

    path: Path
    version: int
    limit_bytes: int | None

    # -- joining ------------------------------------------------------------------------------
    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed by a shell that moves itself into this cgroup and then ``exec``s ``cmd``, so
        the command runs charged to the cgroup from its first byte."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "memory-cap", *cmd]

    # -- figures ------------------------------------------------------------------------------
    def usage_bytes(self) -> int | None:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        try:
            return int(_read(self.path / name))
        except (OSError, ValueError):
            return None

    def peak_bytes(self) -> int | None:
        """Peak charge (anonymous memory + page cache + kernel memory) since creation or last reset."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int(_read(self.path / name))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        """Processes the kernel OOM-killed in this cgroup because the limit was reached."""
        try:
            if self.version == 1:
                return _keyed(self.path / "memory.oom_control").get("oom_kill")
            return _keyed(self.path / "memory.events").get("oom_kill")
        except OSError:
            return None

    def limit_hits(self) -> int | None:
        """How often the charge hit the limit (v1 ``memory.failcnt``; v2 ``max`` of ``memory.events``):
        each hit makes the kernel reclaim memory (page cache first) inside the cgroup."""
        try:
            if self.version == 1:
                return int(_read(self.path / "memory.failcnt"))
            return _keyed(self.path / "memory.events").get("max")
        except (OSError, ValueError):
            return None

    def stat(self) -> dict[str, int]:
        try:
            return _keyed(self.path / "memory.stat")
        except OSError:
            return {}

    def figures(self) -> dict:
        stat = self.stat()
        return {
            "cgroup_version": self.version,
            "limit_bytes": self.limit_bytes,
            "peak_bytes": self.peak_bytes(),
            "oom_kills": self.oom_kills(),
            "limit_hits": self.limit_hits(),
            # v1: total_cache / total_rss; v2: file / anon
            "page_cache_bytes_at_end": stat.get("total_cache", stat.get("file")),
        }

    # -- life cycle ---------------------------------------------------------------------------
    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup once its processes are gone (killing any left behind, all ours)."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            try:
                os.rmdir(self.path)
                return
            except OSError:
                try:
                    pids = [int(p) for p in _read(self.path / "cgroup.procs").split()]
                except (OSError, ValueError):
                    pids = []
                for pid in pids:  # only processes this benchmark started can be in its cgroup
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class CgroupBackend:
    """Where child cgroups are made: ``parent`` folder and cgroup ``version`` (1 or 2)."""

    parent: Path
    version: int

    def create(self, name: str, limit_bytes: int | None) -> MemoryCgroup:
        """A fresh child cgroup with ``limit_bytes`` (``None``: no limit, accounting only)."""
        path = self.parent / f"moe-bench-{os.getpid()}-{next(_counter)}-{name}"
        path.mkdir()
        cg = MemoryCgroup(path, self.version, limit_bytes)
        try:
            if self.version == 1:
                if limit_bytes is not None:
                    _write(path / "memory.limit_in_bytes", str(limit_bytes))
                    if (path / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                        try:
                            _write(path / "memory.memsw.limit_in_bytes", str(limit_bytes))
                        except OSError:
                            pass
                    cg.limit_bytes = int(_read(path / "memory.limit_in_bytes"))  # rounded to pages
            else:
                if limit_bytes is not None:
                    _write(path / "memory.max", str(limit_bytes))
                    if (path / "memory.swap.max").exists():
                        try:
                            _write(path / "memory.swap.max", "0")
                        except OSError:
                            pass
                    value = _read(path / "memory.max")
                    cg.limit_bytes = None if value == "max" else int(value)
        except BaseException:
            cg.remove()
            raise
        return cg

    def describe(self) -> str:
        return f"cgroup v{self.version} under {self.parent}"


def _v2_parent_candidates() -> list[Path]:
    own = _V2_ROOT / _own_cgroup(None).lstrip("/")
    return list(dict.fromkeys([own, _V2_ROOT]))


def detect_backend() -> tuple[CgroupBackend | None, str]:
    """The cgroup backend usable here, or ``None``, with a one-line reason either way.

    Tries cgroup v1 (a child of this process's memory cgroup) then v2 (a child of this process's
    cgroup, else of the root), and proves each by creating, limiting and removing a test cgroup.
    """
    reasons = []
    candidates: list[CgroupBackend] = []
    if (_V1_ROOT / "memory.limit_in_bytes").exists() or (_V1_ROOT / "cgroup.procs").exists():
        own = _V1_ROOT / _own_cgroup("memory").lstrip("/")
        candidates += [CgroupBackend(p, 1) for p in dict.fromkeys([own, _V1_ROOT])]
    elif (_V2_ROOT / "cgroup.controllers").exists():
        if "memory" not in _read(_V2_ROOT / "cgroup.controllers").split():
            reasons.append("cgroup v2 without the memory controller")
        else:
            for parent in _v2_parent_candidates():
                try:
                    if "memory" not in _read(parent / "cgroup.subtree_control").split():
                        _write(parent / "cgroup.subtree_control", "+memory")
                except OSError as exc:
                    reasons.append(f"cannot enable the memory controller in {parent}: {exc.strerror}")
                    continue
                candidates.append(CgroupBackend(parent, 2))
    else:
        reasons.append("no cgroup memory controller mounted at /sys/fs/cgroup")
    for backend in candidates:
        try:
            cg = backend.create("probe", 64 * 2**20)
            ok = cg.peak_bytes() is not None and cg.oom_kills() is not None
            cg.remove()
        except OSError as exc:
            reasons.append(f"cannot create a cgroup in {backend.parent}: {exc.strerror or exc}")
            continue
        if ok:
            return backend, backend.describe()
        reasons.append(f"{backend.parent}: no peak / OOM counters")
    return None, "; ".join(reasons) or "no usable memory cgroup"

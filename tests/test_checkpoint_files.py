"""Hostile and changed checkpoint files: a clear CheckpointError at load, CheckpointChangedError after.

Hostile headers and indexes (overlapping or out-of-file byte ranges, negative dims, offsets that are
strings, floats, bools or negative, a weight_map that is a list or leaves the folder) must fail at
load with a message naming the problem. A shard replaced, truncated or rewritten after loading must
make every later forward pass and ``generate`` raise CheckpointChangedError (never return), and the
store must never hand out bytes of a changed file, even to reads running on several threads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from conftest import fixed_batch
from tiny_models import expert_bytes, tiny_config

import moe_engine
from moe_engine.runtime.store import CheckpointChangedError, CheckpointError, CheckpointStore

ONE_EXPERT = expert_bytes(tiny_config("mixtral"))


def load(path, budget: int | float = ONE_EXPERT):
    return moe_engine.from_pretrained(path, budget=budget, device="cpu", predictor=None)


def forward(model) -> torch.Tensor:
    ids, mask = fixed_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    """``copy(sharded=False) -> Path``: a private copy of the tiny Mixtral checkpoint to damage."""

    def copy(sharded: bool = False) -> Path:
        dst = tmp_path / ("mixtral-sharded" if sharded else "mixtral")
        shutil.copytree(tiny_checkpoint("mixtral", sharded=sharded), dst)
        return dst

    return copy


# ----------------------------------------------------------------------------------------------------
# hostile safetensors headers


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap(header: dict, data: bytes) -> None:
    a, b = [k for k in tensors_by_offset(header) if k.endswith(".w1.weight")][:2]  # the same size
    assert header[a]["shape"] == header[b]["shape"]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def beyond_end(header: dict, data: bytes) -> None:
    last = tensors_by_offset(header)[-1]
    b, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [len(data), len(data) + e - b]


def negative_dim(header: dict, data: bytes) -> None:
    name = tensors_by_offset(header)[3]
    header[name]["shape"] = [-header[name]["shape"][0], *header[name]["shape"][1:]]


def string_offsets(header: dict, data: bytes) -> None:
    name = tensors_by_offset(header)[2]
    header[name]["data_offsets"] = [str(o) for o in header[name]["data_offsets"]]


def negative_offsets(header: dict, data: bytes) -> None:
    name = tensors_by_offset(header)[2]
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-8, e - b - 8]


def bool_offset(header: dict, data: bytes) -> None:
    first = tensors_by_offset(header)[0]  # data_offsets [0, e]: False == 0 in Python, not in safetensors
    header[first]["data_offsets"][0] = False


def float_offsets(header: dict, data: bytes) -> None:
    name = tensors_by_offset(header)[2]
    header[name]["data_offsets"] = [float(o) for o in header[name]["data_offsets"]]


def three_offsets(header: dict, data: bytes) -> None:
    name = tensors_by_offset(header)[2]
    header[name]["data_offsets"] = [*header[name]["data_offsets"], 0]


def unknown_dtype(header: dict, data: bytes) -> None:
    header[tensors_by_offset(header)[1]]["dtype"] = "F4_PACKED"


HOSTILE_HEADERS = [
    (overlap, r"overlap"),
    (beyond_end, r"beyond the end of the file"),
    (negative_dim, r"shape \[-\d+, \d+\].*non-negative"),
    (string_offsets, r"data_offsets \['\d+', '\d+'\].*non-negative integers"),
    (negative_offsets, r"data_offsets \[-8, \d+\].*non-negative integers"),
    (bool_offset, r"data_offsets \[False, \d+\].*non-negative integers"),
    (float_offsets, r"data_offsets \[\d+\.0, \d+\.0\].*non-negative integers"),
    (three_offsets, r"data_offsets \[\d+, \d+, 0\].*two non-negative integers"),
    (unknown_dtype, r"dtype 'F4_PACKED'"),
]


@pytest.mark.parametrize("damage,message", [pytest.param(d, m, id=d.__name__) for d, m in HOSTILE_HEADERS])
def test_hostile_header(ckpt_copy, damage, message):
    path = ckpt_copy()
    file = path / "model.safetensors"
    header, data = read_header(file)
    damage(header, data)
    write_header(file, header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        load(path)
    assert "model.safetensors" in str(info.value)


def test_duplicate_key_in_header(ckpt_copy):
    path = ckpt_copy()
    file = path / "model.safetensors"
    header, data = read_header(file)
    first = tensors_by_offset(header)[0]
    body = json.dumps(header)
    entry = json.dumps({first: header[first]})[1:-1]
    body = body[:-1] + ", " + entry + "}"  # the same tensor name twice
    raw = body.encode() + b" " * (-len(body) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(CheckpointError, match=rf"duplicate key '{re.escape(first)}'"):
        load(path)


# ----------------------------------------------------------------------------------------------------
# hostile indexes


def edit_index(path: Path, edit) -> None:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))


def test_weight_map_is_a_list(ckpt_copy):
    path = ckpt_copy(sharded=True)
    edit_index(path, lambda d: d.update(weight_map=sorted(set(d["weight_map"].values()))))
    with pytest.raises(CheckpointError, match=r"'weight_map' must be a JSON object .* found a list"):
        load(path)


def test_index_is_a_list(ckpt_copy):
    path = ckpt_copy(sharded=True)
    (path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(
        CheckpointError, match=r"index\.json is corrupt: expected a JSON object .* found a JSON list"
    ):
        load(path)


def test_weight_map_value_not_a_string(ckpt_copy):
    path = ckpt_copy(sharded=True)

    def edit(d):
        name = next(iter(d["weight_map"]))
        d["weight_map"][name] = 3

    edit_index(path, edit)
    with pytest.raises(CheckpointError, match=r"weight_map maps tensor .* to 3"):
        load(path)


def _retarget_one(path: Path, target) -> str:
    """Point every tensor of the first shard at ``target(shard_name)``; return that shard's name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    new = target(shard)
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def test_weight_map_escapes_with_dotdot(ckpt_copy, tmp_path):
    path = ckpt_copy(sharded=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = _retarget_one(path, lambda s: f"../outside/{s}")
    shutil.copy(path / shard, outside / shard)  # a real file there: the path alone must be refused
    with pytest.raises(CheckpointError, match=r"leaves the checkpoint folder .* through '\.\.'"):
        load(path)


def test_weight_map_absolute_path(ckpt_copy):
    path = ckpt_copy(sharded=True)
    _retarget_one(path, lambda s: str((path / s).resolve()))
    with pytest.raises(CheckpointError, match=r"absolute path"):
        load(path)


def test_weight_map_escapes_through_symlinked_folder(ckpt_copy, tmp_path):
    path = ckpt_copy(sharded=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (path / "sub").symlink_to(outside, target_is_directory=True)
    shard = _retarget_one(path, lambda s: f"sub/{s}")
    shutil.copy(path / shard, outside / shard)
    with pytest.raises(CheckpointError, match=r"resolves outside the checkpoint folder"):
        load(path)


def test_symlinked_files_load(ckpt_copy, tmp_path):
    """Files that are symlinks (the Hugging Face cache links each snapshot file to ../../blobs) load."""
    path = ckpt_copy(sharded=True)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in path.glob("model-*.safetensors"):
        shutil.move(f, blobs / f.name)
        f.symlink_to(blobs / f.name)
    want = forward(load(path, budget=1.0))
    assert torch.isfinite(want).all()


# ----------------------------------------------------------------------------------------------------
# files changed after loading


def replace_file(file: Path) -> None:
    """A new file (different bytes, same name) moved over the old one, as a re-download does."""
    raw = bytearray(file.read_bytes())
    for i in range(len(raw) - 4096, len(raw)):
        raw[i] ^= 0x55
    tmp = file.with_suffix(".tmp")
    tmp.write_bytes(bytes(raw))
    os.replace(tmp, file)


def truncate_in_place(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def rewrite_in_place(file: Path) -> None:
    """Same size, same inode, different bytes in the data region."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(size - 4096)
        old = f.read(4096)
        f.seek(size - 4096)
        f.write(bytes(b ^ 0x55 for b in old))
    assert file.stat().st_size == size


CHANGES = [replace_file, truncate_in_place, rewrite_in_place]


def expert_shard(path: Path) -> Path:
    """The single file, or a middle shard (holding expert tensors only)."""
    shards = sorted(path.glob("model-*.safetensors"))
    return shards[len(shards) // 2] if shards else path / "model.safetensors"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_changed_after_loading(ckpt_copy, change, sharded):
    path = ckpt_copy(sharded=sharded)
    model = load(path)  # one expert's budget: every forward reads experts again
    forward(model)
    model.engine.store.check_unchanged()  # unchanged so far
    victim = expert_shard(path)
    change(victim)
    with pytest.raises(CheckpointChangedError, match=re.escape(victim.name)):
        model.engine.store.check_unchanged()
    for _ in range(3):  # sticky: every later call fails, none returns
        with pytest.raises(CheckpointChangedError, match=r"changed since loading.*reloaded"):
            forward(model)
    ids, mask = fixed_batch()
    for _ in range(3):
        with pytest.raises(CheckpointChangedError):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    model.close()


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_store_reads_refuse_changed_files(ckpt_copy, change):
    """The store's own reads (without check_unchanged) see the change, and stay refused."""
    path = ckpt_copy(sharded=True)
    store = CheckpointStore.open(path)
    victim = expert_shard(path)
    names = [n for n, t in store.tensors.items() if t.file == victim]
    other = next(n for n, t in store.tensors.items() if t.file != victim)
    before = store.read_tensor(names[0])
    change(victim)
    for _ in range(3):
        with pytest.raises(CheckpointChangedError, match=re.escape(victim.name)):
            store.read_tensor(names[0])
    with pytest.raises(CheckpointChangedError):  # stale: even a file that did not change is refused
        store.read_tensor(other)
    slot = torch.empty(before.numel())
    loc = store.tensors[names[0]]
    from moe_engine.runtime.store import ExpertLocation

    with pytest.raises(CheckpointChangedError):
        store.read_expert_into(ExpertLocation((loc,)), slot)
    store.close()


def test_reads_on_threads_never_return_changed_bytes(ckpt_copy):
    """Four threads read expert tensors while the file is rewritten in place: each read returns the
    original bytes or raises CheckpointChangedError; after the change, every read raises."""
    path = ckpt_copy()
    file = path / "model.safetensors"
    store = CheckpointStore.open(path, page_cache=True)
    names = [n for n in store.tensors if ".experts." in n]
    original = {n: store.read_tensor(n).clone() for n in names}
    changed = threading.Event()
    results: list[str] = []

    def reader(k: int) -> None:
        i, after = 0, 0
        while after < 50:  # until 50 reads have started after the change
            if changed.is_set():
                after += 1
            name = names[(k + i) % len(names)]
            i += 1
            try:
                got = store.read_tensor(name)
            except CheckpointChangedError:
                results.append("refused")
                continue
            results.append("ok" if torch.equal(got, original[name]) else "WRONG")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    raw = bytearray(file.read_bytes())
    for i in range(len(raw) // 2, len(raw)):
        raw[i] ^= 0x55
    with open(file, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(raw))
    changed.set()
    for t in threads:
        t.join()
    assert "WRONG" not in results
    assert "refused" in results
    with pytest.raises(CheckpointChangedError):
        store.read_tensor(names[0])
    store.close()


def test_close_is_idempotent_and_reads_after_close_fail(tiny_checkpoint):
    store = CheckpointStore.open(tiny_checkpoint("mixtral"))
    name = next(iter(store.tensors))
    store.read_tensor(name)
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match=r"store .* is closed; reload the model"):
        store.read_tensor(name)
    with pytest.raises(RuntimeError, match=r"closed"):
        store.check_unchanged()


def test_every_shard_is_open_after_loading(ckpt_copy):
    """Expert-only shards are opened at load, so replacing one later cannot mix old and new weights."""
    path = ckpt_copy(sharded=True)
    store = CheckpointStore.open(path)
    shards = set(path.glob("model-*.safetensors"))
    assert set(store._files) == shards
    fds = [f.fd for f in store._files.values()]
    assert all(os.fstat(fd) for fd in fds)
    store.close()


def test_layers_past_the_model_are_ignored_like_transformers_does(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer (index num_hidden_layers) that
    transformers does not build: its expert tensors must not stop loading."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("deepseek_v3")
    path = tmp_path / "mtp"
    shutil.copytree(src, path)
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    tensors = load_file(path / "model.safetensors")
    extra = {k.replace(".layers.1.", f".layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.1." in k}
    assert any(".experts." in k for k in extra)
    save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    model = moe_engine.from_pretrained(path, budget=1.0, device="cpu")
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    model.close()

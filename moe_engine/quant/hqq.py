"""Calibration-free fitting of group-wise affine quantization (HQQ-style), for the int4/int3/int2 formats.

Owns ``fit_affine``: given weight groups ``w [R, G]`` (one row per group of G consecutive input columns
of one output row), choose per group a scale ``s`` and zero ``z`` and integer codes ``q`` in
``[0, 2^bits)`` so that ``(q - 8) * s + z`` (torch's int4 kernel convention) is close to ``w``.

Method (keeps, per group, the best candidate by squared error after rounding s and z to bf16, the
dtype they are stored in, so the result is never worse than plain min-max):
1. min-max over a grid of clipping ratios (the range shrunk about its midpoint: for 2-3 bits, clipping
   the extremes lowers the error of the bulk);
2. a few alternating iterations: HQQ's half-quadratic zero update (residuals measured in code steps,
   shrunk by the generalised soft threshold of an l_p norm, p < 1, so outliers do not drag the zero;
   Badri & Shaji 2023), then the requantized codes, then the least-squares (s, z) for those codes.

Example::

    q, s, z = fit_affine(w.view(-1, 64), bits=3)          # w [out, in] float32, in % 64 == 0
    w_hat = ((q.float() - 8) * s[:, None] + z[:, None]).view_as(w)
"""

from __future__ import annotations

import torch

CODE_OFFSET = 8
MIN_SCALE = 1e-12  # scale of a constant group (any positive value reproduces it through the zero)

# clipping ratios tried at initialisation, per bit width (1.0 = plain min-max)
CLIP_GRID: dict[int, tuple[float, ...]] = {
    2: (1.0, 0.9, 0.8, 0.7, 0.6),
    3: (1.0, 0.95, 0.9, 0.85, 0.8),
    4: (1.0, 0.95, 0.9),
    8: (1.0,),
}
DEFAULT_ITERS: dict[int, int] = {2: 8, 3: 8, 4: 4, 8: 0}
CHUNK_ELEMENTS = 1 << 16  # weights fitted at once


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round((w - z[:, None]) / s[:, None] + CODE_OFFSET), 0, qmax)


def _dequant(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (q - CODE_OFFSET) * s[:, None] + z[:, None]


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold: the proximal operator of ``|x|^p / beta`` (approximately, for p < 1)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-8).pow(p - 1) / beta)


def fit_affine(
    w: torch.Tensor,
    bits: int,
    iters: int | None = None,
    *,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``w [R, G]`` (float32) -> ``(codes uint8 [R, G], scale [R], zero [R])``.

    scale and zero are float32 holding bf16-representable values (their storage dtype), scale > 0;
    codes lie in ``[0, 2^bits - 1]``. ``iters`` defaults to ``DEFAULT_ITERS[bits]``.
    """
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ValueError(f"fit_affine expects float32 groups [R, G], got {w.dtype} {tuple(w.shape)}")
    if bits not in CLIP_GRID:
        raise ValueError(f"fit_affine supports bits {sorted(CLIP_GRID)}, got {bits}")
    iters = DEFAULT_ITERS[bits] if iters is None else iters
    if w.shape[0] > CHUNK_ELEMENTS // max(w.shape[1], 1):  # chunks that stay in cache: ~2x faster
        rows = max(CHUNK_ELEMENTS // w.shape[1], 1)
        fits = [fit_affine(c, bits, iters, lp_norm=lp_norm, beta=beta, kappa=kappa) for c in w.split(rows)]
        return torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits]), torch.cat([f[2] for f in fits])
    qmax = 2**bits - 1

    def finish(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s = _bf16(s.clamp_min(MIN_SCALE))  # bf16(1e-12) is a positive normal number
        z = _bf16(z)
        q = _codes(w, s, z, qmax)
        err = (w - _dequant(q, s, z)).pow(2).sum(dim=1)
        return q, s, z, err

    # Step 1: min-max over clipping ratios
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)
    half = (wmax - wmin) / 2
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for ratio in CLIP_GRID[bits]:
        # a constant group gets s = MIN_SCALE, z = c + 8 s, code 0: exact (0 stays exactly 0)
        s = _bf16((2 * half * ratio / qmax).clamp_min(MIN_SCALE))
        z = wmin + (1 - ratio) * half + CODE_OFFSET * s  # ratio 1: plain min-max, z = min + 8 s
        best = _keep_best(best, finish(s, z))
    assert best is not None
    q, s, z, _ = best

    # Step 2: alternate HQQ zero updates and least-squares refits
    for _ in range(iters):
        resid = _shrink_lp((w - _dequant(q, s, z)) / s[:, None], beta, lp_norm) * s[:, None]
        z = (w - resid - (q - CODE_OFFSET) * s[:, None]).mean(dim=1)
        beta *= kappa
        q = _codes(w, s, z, qmax)
        qc = q - CODE_OFFSET
        mq, mw = qc.mean(dim=1), w.mean(dim=1)
        dq = qc - mq[:, None]
        var = dq.pow(2).sum(dim=1)
        cov = (dq * (w - mw[:, None])).sum(dim=1)
        s_ls = torch.where(var > 0, cov / var.clamp_min(1e-30), s)
        s = torch.where(s_ls > 0, s_ls, s)
        z = mw - s * mq
        cand = finish(s, z)
        best = _keep_best(best, cand)
        q, s, z = cand[0], cand[1], cand[2]

    q, s, z, _ = best
    return q.to(torch.uint8), s, z


def _keep_best(
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cand: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if best is None:
        return cand
    better = cand[3] < best[3]
    return (
        torch.where(better[:, None], cand[0], best[0]),
        torch.where(better, cand[1], best[1]),
        torch.where(better, cand[2], best[2]),
        torch.where(better, cand[3], best[3]),
    )

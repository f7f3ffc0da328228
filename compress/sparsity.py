"""Semi-structured (N:M, e.g. 2:4) and unstructured sparsity: masks, the one-shot methods that
choose them, and the compressed 2:4 layout the kernels read.

Masks are float {0, 1} of the weight's shape (1 = kept). An N:M mask keeps N of every M
consecutive input columns of each row; an unstructured one keeps a fraction of each row.

Methods (W (out, in); X the layer's inputs, H = 2 X^T X / tokens):
    magnitude   score |W|
    wanda       score |W| * ||X_j||  (Sun et al. 2023: the input column norm, sqrt(diag(H) / 2))
    sparsegpt   SparseGPT (Frantar & Alistarh 2023): columns left to right; at the start of each
                group of M columns (or each block, unstructured) prune by w^2 / U_jj^2 with U the
                Cholesky factor of H^-1, then compensate each pruned column's error on the columns
                after it, exactly as GPTQ does for rounding (``compress.gptq``), so the kept
                weights change too.

The compressed 2:4 layout (``pack_24`` / ``unpack_24``; 2 values kept of every 4):
    values  (out, in / 2)   the kept values of each group of 4, in column order
    meta    (out, in / 8)   uint8: per group the two kept positions i0 < i1 (2 bits each) as the
                            nibble i0 | i1 << 2; two groups per byte, the even group in the low nibble
A group with fewer than two non-zeros keeps zeros at its first free positions, so every group
stores exactly two (the layout has no variable length).
"""

from __future__ import annotations

import re

import torch

from compress.errors import CompressError
from compress.gptq import inverse_hessian_factor


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); 'unstructured' -> None."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise CompressError(f"sparsity pattern {pattern!r} is not N:M with 0 < N < M (e.g. 2:4, 4:8) or 'unstructured'")
    return int(m.group(1)), int(m.group(2))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    out, cols = score.shape
    g = score.reshape(out, cols // m, m)
    keep = torch.zeros_like(g).scatter_(-1, g.topk(n, dim=-1).indices, 1.0)
    return keep.reshape(out, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest (1 - sparsity) fraction of each row's scores."""
    keep = score.shape[1] - int(round(score.shape[1] * sparsity))
    return torch.zeros_like(score).scatter_(1, score.topk(keep, dim=1).indices, 1.0)


def score_mask(score: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
    return nm_mask(score, *pattern) if pattern else row_mask(score, sparsity)


def sparsegpt(w: torch.Tensor, H: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float = 0.5,
              block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(pruned weight with the error compensated, mask, loss sum of err^2 / 2)."""
    W = w.detach().float().clone()
    out, n = W.shape
    W[:, torch.diag(H) == 0] = 0
    U = inverse_hessian_factor(H, damp)
    m = pattern[1] if pattern else 1
    B = m * max(1, block_size // m)
    mask = torch.ones_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d2 = torch.diag(U1) ** 2
        E1 = torch.zeros_like(W1)
        M1 = mask[:, i1:i2]
        if pattern is None:  # this block's share of each row, by the OBS saliency
            M1.copy_(row_mask(W1 ** 2 / d2, sparsity))
        for i in range(i2 - i1):
            if pattern and i % m == 0:
                M1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d2[i:i + m], *pattern)
            q = W1[:, i] * M1[:, i]
            e = (W1[:, i] - q) / U1[i, i]
            loss += (e.double() ** 2).sum() / 2
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            E1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W * mask, mask, float(loss)


# ---------------------------------------------------------------- the compressed 2:4 layout

def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(out, in / 4, 2) the two stored positions of each group: its kept ones, then its first free."""
    out, cols = mask.shape
    g = mask.reshape(out, cols // 4, 4)
    if (g.sum(-1) > 2).any():
        raise CompressError("the weight is not 2:4 sparse (a group of 4 has more than 2 non-zeros)")
    order = torch.arange(4, device=mask.device).expand_as(g)
    rank = torch.where(g > 0, order, order + 4)  # kept positions first, then the others
    return rank.argsort(-1)[..., :2].sort(-1).values


def pack_24(w: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in / 2) in w's dtype, meta (out, in / 8) uint8) of a 2:4-sparse weight."""
    out, cols = w.shape
    if cols % 8:
        raise CompressError(f"the compressed 2:4 layout needs input features divisible by 8; got {cols}")
    pos = _positions(mask if mask is not None else (w != 0).float())
    values = w.reshape(out, cols // 4, 4).gather(-1, pos).reshape(out, cols // 2)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # (out, in / 4)
    return values, nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    out, half = values.shape
    nib = torch.stack([meta & 0xF, meta >> 4], -1).reshape(out, -1).long()  # (out, in / 4)
    pos = torch.stack([nib & 3, nib >> 2], -1)
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)

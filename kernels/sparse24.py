"""2:4 sparse x dense GEMM / GEMV, float values or int4 codes (2:4 x int4, Sparse-Marlin's idea):
y = x @ W^T with W expanded from its compressed form in registers.

Layout read (written by ``compress.sparsity.pack_24`` / the sparsify export, ``sparse24.safetensors``):
    values  (N, K / 2)   fp16/bf16/fp32: the two kept values of each group of 4 input columns
      or
    codes   (N, K / 16)  int32: the kept values as int4, 8 per word (offset-binary, low bits first)
    scale   (N, K / G)   one per group of G input columns of the dense weight (int4 only; symmetric)
    meta    (N, K / 8)   uint8: per group of 4 the positions p0 < p1 of its kept values as the nibble
                         p0 | p1 << 2, two groups per byte, the even group in the low nibble
    W[n, k] = value[n, 2 * (k // 4) + j]  if k % 4 == p_j  else 0      (times the scale for int4)

Tiling as in ``kernels.wna16``: (BLOCK_M, BLOCK_N) output tiles over a K range, fp32 accumulation
with ``tl.dot``, split-K for decode. Each K step reads half the weight bytes of the dense tile
(a quarter with int4) plus 1/8 byte of metadata per weight, and expands them to a dense
(BLOCK_K, BLOCK_N) tile in registers: the win is in bytes moved, which is what decode is bound by.

Three names, in one place: ``triton_sparse24`` (host), ``_sparse24_kernel`` (jit), ``torch_sparse24`` (reference).
"""

from __future__ import annotations

import torch

from kernels.wna16 import launch, triton, tuned

if triton is not None:
    import triton.language as tl


def expand(values_or_codes: torch.Tensor, meta: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 weight (N, K) of a compressed 2:4 weight (int4 codes when ``scale`` is given)."""
    n = meta.shape[0]
    if scale is not None:
        shifts = torch.arange(8, device=meta.device, dtype=torch.int32) * 4
        kept = (((values_or_codes.unsqueeze(-1) >> shifts) & 0xF).reshape(n, -1)[:, : k // 2] - 8).float()
    else:
        kept = values_or_codes.float()
    nib = torch.stack([meta & 0xF, meta >> 4], -1).reshape(n, -1).long()  # (N, K / 4)
    pos = torch.stack([nib & 3, (nib >> 2) & 3], -1)                      # (N, K / 4, 2)
    dense = torch.zeros(n, k // 4, 4, device=meta.device)
    dense.scatter_(-1, pos, kept.reshape(n, k // 4, 2))
    dense = dense.reshape(n, k)
    if scale is not None:
        dense = dense * scale.float().repeat_interleave(k // scale.shape[1], 1)
    return dense


def torch_sparse24(x: torch.Tensor, values_or_codes: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ expand(values_or_codes, meta, x.shape[-1], scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check(x: torch.Tensor, values_or_codes: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None) -> None:
    k, n = x.shape[-1], meta.shape[0]
    if k % 16:
        raise ValueError(f"K={k} must be a multiple of 16 for the 2:4 kernels (8 metadata groups per 4 bytes, "
                         "8 int4 codes per word)")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, k // 8):
        raise ValueError(f"meta must be uint8 of shape (N, K / 8) = {(n, k // 8)}; got {meta.dtype} {tuple(meta.shape)}")
    want = (n, k // 16) if scale is not None else (n, k // 2)
    if tuple(values_or_codes.shape) != want:
        raise ValueError(f"{'codes' if scale is not None else 'values'} must have shape {want}; "
                         f"got {tuple(values_or_codes.shape)}")
    if scale is not None and (scale.shape[0] != n or k % scale.shape[1]):
        raise ValueError(f"scale {tuple(scale.shape)} does not fit N={n}, K={k}: need (N, K / group_size)")


if triton is not None:
    @triton.jit
    def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, s_ptr, y_ptr, M, N, K, GROUP, M_BUCKET,
                         stride_xm, stride_vn, stride_mn, stride_sn, stride_ym, stride_ys,
                         INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        K_PER_SPLIT = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            mask = k_ok[:, None] & (offs_n[None, :] < N)
            grp = offs_k // 4                                   # (BLOCK_K,) the group of 4 each k is in
            byte = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (offs_k // 8)[:, None], mask=mask, other=0)
            nib = (byte.to(tl.int32) >> ((grp % 2) * 4)[:, None]) & 0xF
            r = (offs_k % 4)[:, None]
            p0, p1 = nib & 3, (nib >> 2) & 3
            j = 2 * grp[:, None] + (r == p1).to(tl.int32)      # which stored value this k would be
            kept = ((r == p0) | (r == p1)) & mask
            if INT4:
                word = tl.load(v_ptr + offs_n[None, :] * stride_vn + j // 8, mask=kept, other=0)
                q = ((word >> ((j % 8) * 4)) & 0xF) - 8
                s = tl.load(s_ptr + offs_n[None, :] * stride_sn + (offs_k // GROUP)[:, None], mask=kept, other=0.0)
                w = q.to(tl.float32) * s.to(tl.float32)
            else:
                w = tl.load(v_ptr + offs_n[None, :] * stride_vn + j, mask=kept, other=0.0).to(tl.float32)
            w = tl.where(kept, w, 0.0)
            acc += tl.dot(x.to(tl.float32), w)
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


if triton is not None:
    _sparse24_run = tuned(_sparse24_kernel)


def triton_sparse24(x: torch.Tensor, values_or_codes: torch.Tensor, meta: torch.Tensor,
                    scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a compressed 2:4 weight (int4 codes when ``scale`` is given)."""
    if triton is None:
        raise RuntimeError("triton is not installed: use torch_sparse24, or pip install triton")
    check(x, values_or_codes, meta, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], meta.shape[0]
    v, meta = values_or_codes.contiguous(), meta.contiguous()
    s = scale.contiguous() if scale is not None else v
    group = k // scale.shape[1] if scale is not None else k
    y = launch(_sparse24_run, (x2, v, meta, s, group, x2.stride(0), v.stride(0), meta.stride(0), s.stride(0)),
               m, n, k, x.device, INT4=scale is not None)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)

"""Weight-only quantized GEMM / GEMV (W4A16, W8A16): y = x @ dequant(W)^T, the weight dequantized in
registers, never in memory.

Layout read (compressed-tensors ``pack-quantized``, what our QAT/PTQ exports write):
    packed  (N, K * b / 32) int32   value k of row n sits at bits [(k % P) * b, +b) of word k // P,
                                    P = 32 / b values per word, stored offset-binary (q + 2^(b-1))
    scale   (N, K / G)  fp16/bf16/fp32, one per group of G input columns
    zero    (N, K / G)  int8 or None (symmetric)
    W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]

Tiling (``kernels.tiles``): one program computes a (BLOCK_M, BLOCK_N) tile of y over its share of
K. Each K step loads the (BLOCK_N, BLOCK_K / P) packed words once (rows contiguous, so the loads
coalesce) and unpacks their P values in registers with shifts and masks; the codes become floats
by placing their bits under the exponent of 2^23 (no int-to-float instruction, which runs at a
fraction of the FMA rate). M = 1 (GEMV) has two modes the autotuner picks from: value j of every
word against the strided x slice x[:, j::P] (no reshape), or a (BLOCK_N, words, P) tile against
x read contiguously; products are summed along K in registers, no tensor cores. M > 1: one
``tl.dot`` a tile in x's dtype (the codes are exact integers there). Scales multiply a tile's
partial sums when the tile lies in one group, each word's values otherwise; zero points come off
the codes with the offset.

Three names, in one place: ``triton_wna16`` (host), ``_wna16_kernel`` (jit), ``torch_wna16`` (reference).
"""

from __future__ import annotations

import torch

from kernels.tiles import check_group, group_constexpr, launch, triton, tuned

if triton is not None:
    import triton.language as tl

    from kernels.tiles import codes_to_float, k_range, load_per_group, load_x, store_tile

BITS = (4, 8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(N, words) int32 -> (N, k) int32 values in [-2^(b-1), 2^(b-1))."""
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked: the raw bits
    return u.reshape(packed.shape[0], -1)[:, :k] - (1 << (bits - 1))


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, k: int) -> torch.Tensor:
    """The float32 weight (N, K) the layout stores."""
    q = unpack(packed, bits, k).float()
    group = k // scale.shape[1]
    s = scale.float().repeat_interleave(group, 1)
    z = zero.float().repeat_interleave(group, 1) if zero is not None else 0.0
    return (q - z) * s


def torch_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize, then a float32 matmul; returned in x's dtype."""
    k = x.shape[-1]
    y = x.float() @ dequantize(packed, scale, zero, bits, k).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> None:
    """One-line errors for what the kernel does not take (before anything is allocated)."""
    if bits not in BITS:
        raise ValueError(f"W{bits}A16 is not supported; bits must be one of {BITS}")
    k, n = x.shape[-1], packed.shape[0]
    if k % (32 // bits):
        raise ValueError(f"K={k} must be a multiple of {32 // bits} (values per int32 word at {bits} bits)")
    if packed.shape[1] * (32 // bits) != k:
        raise ValueError(f"packed weight {tuple(packed.shape)} does not hold K={k} {bits}-bit values per row")
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit N={n}, K={k}: need (N, K / group_size)")
    check_group(k, groups)
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero point {tuple(zero.shape)} must have the scale's shape {tuple(scale.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")


if triton is not None:
    @triton.jit
    def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G_COUNT, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SPLIT: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GEMV_MODE: tl.constexpr, LOOP_STAGES: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER
        ONE_GROUP: tl.constexpr = GROUP >= BLOCK_K  # a tile lies inside one group: scale its partial sums
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_lo, k_hi = k_range(pid_k, K, SPLIT, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)    # GEMM
        acc_w = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # GEMV: one partial sum per word slot, reduced at the end
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):  # GEMV loads prefetched (cp.async)
            wi = k0 // PER + tl.arange(0, WORDS)
            cols = wi * PER  # the first input column of each word
            words = tl.load(w_ptr + offs_n[:, None] * stride_wn + wi[None, :],
                            mask=n_ok[:, None] & (wi[None, :] < K // PER), other=0)
            scols = k0 + tl.arange(0, 1) if ONE_GROUP else cols
            s = load_per_group(s_ptr, offs_n, n_ok, scols, G_COUNT, stride_sn, GROUP).to(tl.float32)
            if HAS_ZERO:  # offset-binary, and the zero point, taken off the codes together (fp32)
                zero = load_per_group(z_ptr, offs_n, n_ok, scols, G_COUNT, stride_sn, GROUP)
                off = zero.to(tl.float32) + (1 << (BITS - 1))
            else:
                off = tl.full((BLOCK_N, 1), 1 << (BITS - 1), tl.float32)
            if BLOCK_M == 1 and GEMV_MODE == 0:
                # GEMV, strided: value j of every word is input column cols + j, against the slice x[cols + j]
                part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                for j in tl.static_range(PER):
                    xj = load_x(x_ptr, offs_m, cols + j, M, K, stride_xm).to(tl.float32)
                    part += codes_to_float((words >> (j * BITS)) & ((1 << BITS) - 1), off) * xj
                acc_w += part * s
            else:
                # (BLOCK_N, WORDS, PER) values in column order, against the x tile read contiguously
                u3 = (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
                w3 = codes_to_float(u3, off[:, :, None])
                if BLOCK_M == 1:  # GEMV, 3-D
                    xk = cols[:, None] + tl.arange(0, PER)[None, :]
                    x3 = tl.load(x_ptr + pid_m * stride_xm + xk, mask=xk < K, other=0.0).to(tl.float32)
                    acc_w += tl.sum(w3 * x3[None, :, :], axis=2) * s
                else:  # GEMM: one tl.dot a tile in x's dtype (codes exact there), scaled after it in one group
                    x = load_x(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm)
                    if ONE_GROUP:
                        w = tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(x.dtype)
                        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION) * tl.trans(s)
                    else:
                        w = tl.reshape(w3 * s[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)
                        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if BLOCK_M == 1:
            acc = tl.reshape(tl.sum(acc_w, axis=1), (1, BLOCK_N))
        store_tile(y_ptr, acc, offs_m, offs_n, M, N, pid_k, stride_ym, stride_ys)

    _wna16_run = tuned(_wna16_kernel, ["BITS", "HAS_ZERO"], gemv_modes=(0, 1))


def triton_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for the packed weight; x (..., K) fp16/bf16/fp32; y in x's dtype.
    ``config`` fixes the tiles (BLOCK_M/N/K, SPLIT) instead of autotuning them."""
    if triton is None:
        raise RuntimeError("triton is not installed: use torch_wna16, or pip install triton")
    check(x, packed, scale, zero, bits)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], packed.shape[0]
    packed, scale = packed.contiguous(), scale.contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale
    y = launch(_wna16_run, (x2, packed, scale, zero_arg), (scale.shape[1],),
               (x2.stride(0), packed.stride(0), scale.stride(0)), m, n, k, x, config,
               BITS=bits, GROUP=group_constexpr(k, scale.shape[1]), HAS_ZERO=zero is not None)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)

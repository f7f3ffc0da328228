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
coalesce) and unpacks their P values in registers. M = 1 (GEMV, no tensor cores): value j of every
word against the strided x slice x[:, j::P], split in registers from a (words, P) tile of x that
Triton prefetches with the weights, each thread's x serving all the rows it holds. A code is not
unpacked at all: one AND keeps its bits in place and the word is read as an fp32 denormal u *
2^(p-149) (exact; FMAs take denormals at full rate), against x scaled by 2^(85-p) on the x side, so
a value costs an AND and an FMA (plus one shift a word for the values above bit 23); the offset and
zero point come off once per word against its sum of x. Decode is bound by instructions per weight
as much as by bytes: on an H200 the GEMV this replaced (12.8 SASS instructions a value, one x load
each) ran int4 and int8 at the same ~1.6e12 values/s; this one is 3.35 a value at 256 x 128 tiles
(``scripts/kernel_ptx.py`` counts them without a GPU). M > 1: one ``tl.dot`` a tile in x's dtype
(the codes, put under the exponent of 2^23, are exact integers there). Scales multiply a tile's
partial sums when the tile lies in one group, each word's values otherwise.

Three names, in one place: ``triton_wna16`` (host), ``_wna16_kernel`` (jit), ``torch_wna16`` (reference).
"""

from __future__ import annotations

import torch

from kernels.tiles import check_group, group_constexpr, launch, triton, tuned

if triton is not None:
    import triton.language as tl

    from kernels.tiles import (codes_to_float, denormal_code, k_range, load_per_group, load_x, pow2, quarters,
                               store_tile)

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
    def _term(words, high, xj, j: tl.constexpr, BITS: tl.constexpr, part):
        """part + value j of every word times its x slice xj, scaled by 2^-64 (one FMA a value): the code
        as an fp32 denormal in place (``denormal_code``; from the shifted word past the first IN_PLACE)."""
        IN_PLACE: tl.constexpr = (23 - BITS) // BITS + 1
        HIGH_SHIFT: tl.constexpr = BITS * (32 // BITS - IN_PLACE)
        if j < IN_PLACE:
            return part + denormal_code(words, BITS * j, BITS) * (xj * pow2(85 - BITS * j))[None, :]
        else:
            x_scaled = xj * pow2(85 + HIGH_SHIFT - BITS * j)
            return part + denormal_code(high, BITS * j - HIGH_SHIFT, BITS) * x_scaled[None, :]

    @triton.jit
    def _four_terms(part, words, high, x0, x1, x2, x3, J0: tl.constexpr, BITS: tl.constexpr):
        """part + the values J0 .. J0 + 3 of every word against their x slices x0 .. x3, in that order."""
        part = _term(words, high, x0, J0, BITS, part)
        part = _term(words, high, x1, J0 + 1, BITS, part)
        part = _term(words, high, x2, J0 + 2, BITS, part)
        return _term(words, high, x3, J0 + 3, BITS, part)

    @triton.jit
    def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, M, N, K, G_COUNT, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_ym, stride_ps,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SPLIT: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      LOOP_STAGES: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER
        ONE_GROUP: tl.constexpr = GROUP >= BLOCK_K  # a tile lies inside one group: scale its partial sums
        IN_PLACE: tl.constexpr = (23 - BITS) // BITS + 1  # GEMV: values of a word that fit under bit 23
        HIGH_SHIFT: tl.constexpr = BITS * (PER - IN_PLACE)  # and the shift that brings the rest there
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
            if ONE_GROUP:  # one scale a row: a 1-D load, so the tile's layout follows the words'
                s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            else:
                s = load_per_group(s_ptr, offs_n, n_ok, cols, G_COUNT, stride_sn, GROUP).to(tl.float32)
            if HAS_ZERO:  # offset-binary, and the zero point, taken off the codes together (fp32)
                if ONE_GROUP:
                    zero = tl.load(z_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0)[:, None]
                else:
                    zero = load_per_group(z_ptr, offs_n, n_ok, cols, G_COUNT, stride_sn, GROUP)
                off = zero.to(tl.float32) + (1 << (BITS - 1))
            else:
                off = tl.full((BLOCK_N, 1), 1 << (BITS - 1), tl.float32)
            if BLOCK_M == 1:
                # GEMV: value j of every word meets the strided x slice x[cols + j], shared by all the
                # tile's rows a thread holds. Code u comes out as an exact fp32 denormal by one AND
                # (``denormal_code``), against x scaled by a power of two on the x side: a value costs an
                # AND and an FMA. The offset and zero point come off once a word, against its sum of x.
                x_ok = wi < K // PER
                high = words >> HIGH_SHIFT  # the values past the first IN_PLACE, under bit 23 (one shift)
                # x for the tile as (WORDS, PER): 16 contiguous bytes a word, so the load is pipelined
                # (cp.async) with the weights', then split into the PER strided slices in registers
                xt = tl.load(x_ptr + pid_m * stride_xm + cols[:, None] + tl.arange(0, PER)[None, :],
                             mask=x_ok[:, None], other=0.0).to(tl.float32)
                x_sum = tl.sum(xt, axis=1)
                part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                if PER == 8:  # xt[:, 4a + 2b + c]: split off c, then j = c + 2 (2a + b)
                    even, odd = tl.split(tl.reshape(xt, (WORDS, 2, 2, 2)))
                    x0, x2, x4, x6 = quarters(even)
                    x1, x3, x5, x7 = quarters(odd)
                    part = _four_terms(part, words, high, x0, x1, x2, x3, 0, BITS)  # in j order: fewer
                    part = _four_terms(part, words, high, x4, x5, x6, x7, 4, BITS)  # registers live
                else:  # PER == 4: xt[:, 2b + c], j = 2b + c
                    x0, x1, x2, x3 = quarters(tl.reshape(xt, (WORDS, 2, 2)))
                    part = _four_terms(part, words, high, x0, x1, x2, x3, 0, BITS)
                acc_w += s * (part * pow2(64) - off * x_sum[None, :])
            else:
                # (BLOCK_N, WORDS, PER) values in column order, against the x tile read contiguously
                u3 = (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
                w3 = codes_to_float(u3, off[:, :, None])
                x = load_x(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm)
                if ONE_GROUP:  # one tl.dot a tile in x's dtype (codes exact there), scaled after it
                    w = tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(x.dtype)
                    acc += tl.dot(x, tl.trans(w), input_precision=PRECISION) * tl.trans(s)
                else:
                    w = tl.reshape(w3 * s[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)
                    acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if BLOCK_M == 1:
            acc = tl.reshape(tl.sum(acc_w, axis=1), (1, BLOCK_N))
        store_tile(y_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, pid_k, stride_ym, stride_ps, SPLIT)

    # GEMV tiles: sizePerThread [1, 4] words and 8 x 4 threads a warp, so 64 to 256 rows give each
    # thread 2 to 8 rows (SASS per int4 value at sm_90, scripts/kernel_ptx.py: 3.71 at 64 x 128, 3.66
    # at 128 x 128, 3.35 at 256 x 128, against 12.8 for the one-row-a-thread GEMV it replaced)
    _wna16_run = tuned(_wna16_kernel, ["BITS", "HAS_ZERO"],
                       gemv_tiles=((64, 128, 2), (128, 128, 4), (256, 128, 4), (256, 64, 4), (128, 256, 4)))


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

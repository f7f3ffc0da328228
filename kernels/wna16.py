"""Weight-only quantized GEMM / GEMV (W4A16, W8A16): y = x @ dequant(W)^T, the weight dequantized in
registers, never in memory.

Layout read (compressed-tensors ``pack-quantized``, what our QAT/PTQ exports write):
    packed  (N, K * b / 32) int32   value k of row n sits at bits [(k % P) * b, +b) of word k // P,
                                    P = 32 / b values per word, stored offset-binary (q + 2^(b-1))
    scale   (N, K / G)  fp16/bf16/fp32, one per group of G input columns
    zero    (N, K / G)  int8 or None (symmetric)
    W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]

Tiling: one program computes a (BLOCK_M, BLOCK_N) tile of y over a K range (its 1/SPLIT share);
on CUDA tile sizes and SPLIT are autotuned per (M bucket, N, K), in the interpreter one config
runs (it fails with two or more autotune configs). Each K step loads a
(BLOCK_M, BLOCK_K) tile of x and the (BLOCK_K, BLOCK_N) tile of packed words it needs (each word
loaded for the P values in it: the cache serves the repeats), unpacks with a shift and a mask,
scales, and accumulates in fp32 with ``tl.dot``. Decode (M <= 16) splits K across SPLIT
programs, each writing fp32 partial sums that the host adds: more programs for a GEMV that would
otherwise occupy N / BLOCK_N of them.

Three names, in one place: ``triton_wna16`` (host), ``_wna16_kernel`` (jit), ``torch_wna16`` (reference).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
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
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero point {tuple(zero.shape)} must have the scale's shape {tuple(scale.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")


if triton is not None:
    @triton.jit
    def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, GROUP, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                      BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        PER: tl.constexpr = 32 // BITS
        K_PER_SPLIT = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # program pid_k's share of K
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            # (BLOCK_K, BLOCK_N) tile of W^T: value k of row n from word k // PER
            w_mask = k_ok[:, None] & (offs_n[None, :] < N)
            words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // PER)[:, None], mask=w_mask, other=0)
            shift = ((offs_k % PER) * BITS)[:, None]
            q = ((words >> shift) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
            g = (offs_k // GROUP)[:, None]
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g, mask=w_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32)
            if HAS_ZERO:
                w = w - tl.load(z_ptr + offs_n[None, :] * stride_sn + g, mask=w_mask, other=0).to(tl.float32)
            w = w * s
            acc += tl.dot(x.to(tl.float32), w)
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


MAX_SPLIT = 8


def launch_config(m: int, k: int) -> dict:
    """The one config used in the interpreter (which takes no autotuning), chosen by M."""
    block_k = 32
    if m <= 16:  # decode: a GEMV-like tile, K split so that ~4 programs work per output block
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT": max(1, min(MAX_SPLIT, k // (block_k * 4)))}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT": 1}


def cuda_configs() -> list:
    """Autotuning candidates on CUDA: decode tiles with split-K, prefill tiles without."""
    out = []
    for bn in (32, 64, 128):
        for bk in (64, 128, 256):
            for split in (1, 2, 4, 8):
                out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split}, num_warps=4,
                                         num_stages=3))
    for bm, bn in ((64, 64), (64, 128), (128, 128)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT": 1}, num_warps=8, num_stages=3))
    return out


def prune_by_m(configs, named_args, **kwargs):
    """Decode tiles for M <= 16, prefill tiles above."""
    small = named_args["M_BUCKET"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small] or configs


def tuned(kernel):
    """On CUDA the kernel autotunes per (M bucket, N, K); in the interpreter it runs as is."""
    if INTERPRET:
        return kernel
    return triton.autotune(configs=cuda_configs(), key=["M_BUCKET", "N", "K"],
                           prune_configs_by={"early_config_prune": prune_by_m})(kernel)


def launch(kernel, args: tuple, m: int, n: int, k: int, device, **consts) -> torch.Tensor:
    """Run ``kernel`` (tuned or not) on an fp32 (splits, M, N) buffer and return the summed (M, N)."""
    bucket = 1 << max(0, (m - 1).bit_length())
    if INTERPRET:
        cfg = launch_config(m, k)
        partial = torch.zeros(cfg["SPLIT"], m, n, device=device, dtype=torch.float32)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT"])
        kernel[grid](*args[:4], partial, m, n, k, *args[4:5], bucket, *args[5:], partial.stride(1), partial.stride(0),
                     **consts, **cfg)
    else:
        partial = torch.empty(MAX_SPLIT, m, n, device=device, dtype=torch.float32)

        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"]

        kernel[grid](*args[:4], partial, m, n, k, *args[4:5], bucket, *args[5:], partial.stride(1), partial.stride(0),
                     **consts)
        # only the chosen config's splits were written by this call (tuning runs may have left others)
        return partial[: kernel.best_config.kwargs["SPLIT"]].sum(0)
    return partial.sum(0)


if triton is not None:
    _wna16_run = tuned(_wna16_kernel)


def triton_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for the packed weight; x (..., K) fp16/bf16/fp32; y in x's dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed: use torch_wna16, or pip install triton")
    check(x, packed, scale, zero, bits)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], packed.shape[0]
    packed, scale = packed.contiguous(), scale.contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale
    y = launch(_wna16_run, (x2, packed, scale, zero_arg, k // scale.shape[1], x2.stride(0), packed.stride(0),
                            scale.stride(0)), m, n, k, x.device, BITS=bits, HAS_ZERO=zero is not None)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)

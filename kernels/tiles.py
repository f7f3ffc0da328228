"""What the Triton kernels share: the tile configs, the split-K choice, the launch, and the jit
pieces every kernel's K loop is made of (its share of K, the x tile, the per-group scales, codes
to floats, the store).

Two paths, chosen by BLOCK_M:
    BLOCK_M == 1   GEMV (one token a row of x): the weight tile times x, summed along K in
                   registers; no tensor cores, nothing padded to 16 rows. x is read once per
                   thread for all the rows the thread holds (a tile of more rows than threads
                   reuses each x value that many times), as a tile Triton prefetches.
    BLOCK_M >= 16  GEMM: one ``tl.dot`` a tile in x's dtype with an fp32 accumulator.
Scales multiply a tile's partial sums when the tile lies inside one group, each word's (or unit's)
values otherwise. Group sizes are powers of two, so a tile either lies inside one group or holds
whole groups; one scale per row is passed as ``PER_ROW`` (a group longer than any K). The jit
pieces: ``k_range`` (a program's share of K), ``load_x``, ``load_per_group`` (scales, zero
points), ``codes_to_float`` (integer codes to floats without an int-to-float instruction) and
``store_tile``; ``quarters`` (strided columns split out of a tile); ``denormal_code`` and ``pow2``
(a code as an exact fp32 denormal, for the GEMV's AND-and-FMA-a-value loop).

The K loop is ``tl.range(..., num_stages=LOOP_STAGES)``: without it Triton pipelines only loads
that feed a ``tl.dot``, so the GEMV's weight loads waited one by one (no cp.async in its PTX); with
it they are prefetched LOOP_STAGES - 1 tiles ahead (``scripts/kernel_ptx.py`` counts the cp.async).

Split-K: at decode K can be split over SPLIT programs that write fp32 partial sums; the last of a
tile's SPLIT programs to finish (an atomic count per tile) adds them in split order and stores the
tile in x's dtype, then resets its count, so a layer is one launch (a separate sum was a second
kernel per linear: on an H200, CUDA-graph decode of the int4 teacher ran 0.79x bf16, launch-bound).
The autotuner chooses SPLIT among 4, 8 and 16 at M = 1, 1 and 4 up to M = 16; a fixed config gets
``choose_split``'s, which splits only where N alone gives too few programs; a prefill tile stores
its finished tile directly.

On CUDA the tile sizes are autotuned per (M bucket, N, K, dtype and the constexprs); a ``config``
argument fixes them instead (the self-test uses that to hit every path). Under
``TRITON_INTERPRET=1`` the fixed config always runs (the interpreter fails with two or more
autotune configs).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference paths still work
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPLIT = 16
PER_ROW = 1 << 30  # the GROUP constexpr for one scale per row: longer than any K
COUNTERS = 1 << 20  # split-K arrival counts a device, one per output tile, each back at 0 after its tile
_counters: dict = {}


def m_bucket(m: int) -> int:
    """The autotune key for M: 1 (GEMV), 16 (small decode batches), then powers of two up to 128."""
    return 1 if m == 1 else 16 if m <= 16 else min(128, 1 << (m - 1).bit_length())


def group_constexpr(k: int, groups: int) -> int:
    return PER_ROW if groups == 1 else k // groups


def check_group(k: int, groups: int) -> None:
    group = k // groups
    if groups > 1 and (group < 16 or group & (group - 1)):
        raise ValueError(f"group size {group} is not supported by the kernels: use a power of two >= 16 "
                         "(32, 64, 128) or one scale per row")


def choose_split(m: int, n: int, k: int, device: torch.device) -> int:
    """1 unless N gives fewer programs than the GPU has SMs at decode; then enough to fill it."""
    if m > 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = -(-n // 16)
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLIT, -(-sms // programs), k // 256))


def fixed_config(m: int, split: int | None = None) -> dict:
    """One config per path: what the interpreter runs, and what ``config=`` defaults build on."""
    cfg = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64} if m == 1 else {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
    cfg["LOOP_STAGES"] = 3
    if split is not None:
        cfg["SPLIT"] = split
    return cfg


def cuda_configs(gemv_tiles: tuple) -> list:
    """Autotuning candidates. GEMV (M = 1): the kernel's own (BLOCK_N, BLOCK_K, warps[, constexprs]) tiles, chosen
    so that each thread holds several rows and reuses the x it loads (measured on an H200: with one
    row a thread, x's loads and conversions were half the loop), K split 4, 8 or 16 ways so that
    a few hundred programs keep loads in flight however few BLOCK_N rows N has. Small decode
    batches (M <= 16): tl.dot tiles with split 1 or 4. Prefill: no split. LOOP_STAGES = num_stages."""
    c = []
    for bn, bk, warps, *extra in gemv_tiles:
        for split in (4, 8, 16):
            c.append(triton.Config({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "LOOP_STAGES": 3,
                                    **(extra[0] if extra else {})}, num_warps=warps, num_stages=3))
    for bn, bk in ((32, 128), (64, 128), (32, 256)):
        for split in (1, 4):
            c.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "LOOP_STAGES": 3},
                                   num_warps=4, num_stages=3))
    for bm, bn, bk, warps in ((64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 8), (32, 64, 128, 4)):
        c.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1, "LOOP_STAGES": 3},
                               num_warps=warps, num_stages=3))
    return c


def prune_by_m(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    want = (lambda bm: bm == 1) if bucket == 1 else (lambda bm: bm == 16) if bucket == 16 else (lambda bm: bm > 16)
    return [c for c in configs if want(c.kwargs["BLOCK_M"])]


def _bench(fn, quantiles=None, **kwargs):
    """Autotuning timer: short (the kernels take microseconds), median with the given quantiles."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def tuned(kernel, consts: list[str], gemv_tiles: tuple):
    """The autotuned kernel on CUDA (keyed by M bucket, N, K, the dtypes and ``consts``; GEMV tiles
    ``gemv_tiles``, each (BLOCK_N, BLOCK_K, warps) or (..., {constexpr: value}) for a kernel's own GEMV
    variants); the plain one in the interpreter."""
    if INTERPRET:
        return kernel
    import triton.testing  # noqa: F401 - _bench needs it

    return triton.autotune(configs=cuda_configs(gemv_tiles), key=["M_BUCKET", "N", "K", "GROUP", *consts],
                           do_bench=_bench,
                           prune_configs_by={"early_config_prune": prune_by_m})(kernel)


def launch(run, tensors: tuple, scalars: tuple, strides: tuple, m: int, n: int, k: int, x: torch.Tensor,
           config: dict | None = None, **consts) -> torch.Tensor:
    """Run ``run`` as kernel(*tensors, y, parts, counts, M, N, K, *scalars, M_BUCKET, *strides, stride_ym,
    stride_ps, ...) and return y (M, N) in x's dtype.

    An autotuner (CUDA) picks the tiles and, at decode, the split: every decode config may write
    fp32 partial sums into a buffer of MAX_SPLIT slots, which the kernel itself adds (``store_tile``).
    A fixed ``config`` (and the interpreter's) carries its SPLIT or gets ``choose_split``'s; split 1
    stores y directly."""
    consts["PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"
    bucket = m_bucket(m)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"]

    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    autotuned = config is None and hasattr(run, "configs")
    cfg = {} if autotuned else dict(config) if config is not None else fixed_config(m)
    if not autotuned:
        cfg["SPLIT"] = cfg.get("SPLIT") or choose_split(m, n, k, x.device)
        cfg.setdefault("LOOP_STAGES", 3)
    slots = (MAX_SPLIT if bucket <= 16 else 1) if autotuned else cfg["SPLIT"]
    parts = torch.empty(slots, m, n, device=x.device, dtype=torch.float32) if slots > 1 else y
    counters = _counts(x.device, m * triton.cdiv(n, 8) if slots > 1 else 0)  # any tile of >= 8 columns
    args = (*tensors, y, parts, counters, m, n, k, *scalars, bucket, *strides, y.stride(0), parts.stride(0))
    if autotuned:
        run[grid](*args, **consts)
        return y
    kernel = run.fn if hasattr(run, "configs") else run  # a fixed config bypasses the autotuner
    if not INTERPRET:
        cfg.setdefault("num_warps", 4)
    kernel[grid](*args, **consts, **cfg)
    return y


def _counts(device: torch.device, need: int) -> torch.Tensor:
    """The device's split-K arrival counts (zeros; every kernel leaves them at zero). Allocated once
    and never replaced, so CUDA graphs that captured it keep a valid address."""
    if need > COUNTERS:
        raise ValueError(f"M x N / 8 = {need} output tiles exceed the split-K counters ({COUNTERS}); "
                         "use fewer rows at decode")
    key = (device.type, device.index)
    if key not in _counters:
        _counters[key] = torch.zeros(COUNTERS, device=device, dtype=torch.int32)
    return _counters[key]


if triton is not None:
    @triton.jit
    def k_range(pid_k, K, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program pid_k's share [lo, hi) of K, in whole BLOCK_K tiles."""
        per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        lo = pid_k * per
        return lo, tl.minimum(lo + per, K)

    @triton.jit
    def load_x(x_ptr, offs_m, cols, M, K, stride_xm):
        """x at rows offs_m and columns ``cols`` (a strided slice of the tile), zero outside x."""
        return tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                       mask=(offs_m[:, None] < M) & (cols[None, :] < K), other=0.0)

    @triton.jit
    def load_per_group(ptr, offs_n, n_ok, cols, G_COUNT, stride_n, GROUP: tl.constexpr):
        """(BLOCK_N, len(cols)) of a per-group tensor (scales, zero points) at input columns ``cols``."""
        g = cols // GROUP
        return tl.load(ptr + offs_n[:, None] * stride_n + g[None, :], mask=n_ok[:, None] & (g[None, :] < G_COUNT),
                       other=0)

    @triton.jit
    def codes_to_float(u, off):
        """Unsigned integer codes u (int32 in [0, 2^23)) minus ``off`` (their offset and zero point, fp32),
        as fp32, without an int-to-float conversion (a slow instruction): u's bits under the exponent
        of 2^23 make the float 2^23 + u exactly."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (off + 8388608.0)

    @triton.jit
    def pow2(e: tl.constexpr):
        """2^e as an fp32 constant (-126 <= e <= 127), built from its bits."""
        return tl.full((), (e + 127) << 23, tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def quarters(t):
        """(..., 2, 2) -> its four (...) slices in the order 2a + b of the last two indices (register
        splits: how a kernel takes the strided columns out of a contiguously loaded tile)."""
        lo, hi = tl.split(t)
        q0, q2 = tl.split(lo)
        q1, q3 = tl.split(hi)
        return q0, q1, q2, q3

    @triton.jit
    def denormal_code(words, P: tl.constexpr, BITS: tl.constexpr):
        """The code u (unsigned, BITS wide) at bit P (P + BITS <= 23) of each word as the fp32 denormal
        u * 2^(P - 149): one AND that keeps its bits in place, nothing else. Exact, and an FMA takes
        denormals at full rate (Triton's fp32 arithmetic does not flush them to zero): multiplied by
        x * 2^(85 - P), it gives u * x * 2^-64, a normal float."""
        return (words & (((1 << BITS) - 1) << P)).to(tl.float32, bitcast=True)

    @triton.jit
    def store_tile(y_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, pid_k, stride_ym, stride_ps,
                   SPLIT: tl.constexpr):
        """The finished tile in y's dtype. Split K: this program's fp32 partial sum goes to slot pid_k;
        the tile's last program to arrive (an acq_rel atomic count, after a barrier so every thread's
        partial is written) adds the SPLIT slots in order (the same sum whichever program is last),
        stores y, and puts the count back to 0 for the next launch."""
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            part = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # slot (M, N), contiguous
            tl.store(part + pid_k * stride_ps, acc, mask=ok)
            tl.debug_barrier()
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT):
                    total += tl.load(part + s * stride_ps, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y_ptr.dtype.element_ty),
                         mask=ok)
                tl.atomic_xchg(count_ptr + tile, 0)

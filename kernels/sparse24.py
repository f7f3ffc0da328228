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

Tiling as in ``kernels.tiles``, by units of 16 input columns: a unit is 8 kept values (one int32
word of int4 codes) and 16 bits of metadata (the uint8 metadata read as int16), in which kept
value u's position inside its group of 4 (group u // 2) is bits 2u..2u+1. The metadata is read as
``pack_24`` writes it: the two positions of a group in increasing order. M = 1 (GEMV), two modes
the autotuner picks from. Mode 0, by pairs of units: each thread takes two adjacent units of several
rows (4 bytes of metadata, 32 of values or 8 of codes, 64 of x: all prefetched with cp.async), and
picks each kept value's x without a select: the x of a position p in {0, 1, 2} is
xa + b0 (xb - xa) + b1 (xc - xa), an FMA per metadata bit read in place as an fp32 denormal
(``position_bit``). Mode 1, by tiles: one row a thread, x picked by selects (the earlier GEMV,
fewer registers). int4 codes become floats without an int-to-float instruction (see
``kernels.tiles.codes_to_float``). M > 1: the dense (BLOCK_N, BLOCK_K) tile is built in registers
and goes through one ``tl.dot``. Each K step reads half the weight bytes of the dense tile (a
quarter with int4) plus 1/8 byte of metadata per weight: the win is in bytes moved, which is what
decode is bound by.

Three names, in one place: ``triton_sparse24`` (host), ``_sparse24_kernel`` (jit), ``torch_sparse24`` (reference).
"""

from __future__ import annotations

import torch

from kernels.tiles import check_group, group_constexpr, launch, triton, tuned

if triton is not None:
    import triton.language as tl

    from kernels.tiles import codes_to_float, k_range, load_per_group, load_x, pow2, quarters, store_tile


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
    if scale is not None:
        check_group(k, scale.shape[1])


if triton is not None:
    @triton.jit
    def position_bit(meta, k: tl.constexpr):
        """Bit k (< 16) of the metadata, in place, as an fp32: 0 or the denormal 2^(k - 149)."""
        return (meta & (1 << k)).to(tl.float32, bitcast=True)

    @triton.jit
    def _code(words, i: tl.constexpr):
        """Kept value i of every unit's int4 word, as the float q (offset taken off)."""
        return codes_to_float((words >> (4 * i)) & 0xF, 8.0)

    @triton.jit
    def _group_term(part, meta, h: tl.constexpr, va, vb, xa, xb, xc, xd):
        """part + group h's two kept values of every unit times the x of their columns, scaled by 2^-64:
        the first sits at 0, 1 or 2, so its x is xa + b0 (xb - xa) + b1 (xc - xa) for its position bits b0,
        b1; the second sits at 1, 2 or 3: (xb + xc - xd) + b1 (xd - xb) + b0 (xd - xc). A bit is taken in
        place as an fp32 denormal (``position_bit``) against its coefficient times 2^(85 - bit)."""
        xs_a = ((xa * pow2(-64))[None] + position_bit(meta, 4 * h) * ((xb - xa) * pow2(85 - 4 * h))[None]
                + position_bit(meta, 4 * h + 1) * ((xc - xa) * pow2(84 - 4 * h))[None])
        xs_b = (((xb + xc - xd) * pow2(-64))[None]
                + position_bit(meta, 4 * h + 3) * ((xd - xb) * pow2(82 - 4 * h))[None]
                + position_bit(meta, 4 * h + 2) * ((xd - xc) * pow2(83 - 4 * h))[None])
        return part + va * xs_a + vb * xs_b

    @triton.jit
    def _gemv_pairs(acc_p, x_ptr, v_ptr, meta_ptr, s_ptr, k0, pid_m, offs_n, n_ok, K, G_COUNT,
                    stride_xm, stride_vn, stride_mn, stride_sn,
                    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One K tile of the GEMV, by pairs of units: each thread takes two adjacent units (4 bytes of
        metadata, 8 of int4 codes or 32 of values, 64 of x: loads of 4 bytes or more, so Triton prefetches
        them all with cp.async) of several rows; pairs are visited in a scrambled order inside the tile (no
        two adjacent), so Triton spreads threads over pairs and repeats over rows, and each thread's x
        serves all its rows."""
        PAIRS: tl.constexpr = BLOCK_K // 32
        pi = (tl.arange(0, PAIRS) * 3) & (PAIRS - 1)
        ui = k0 // 16 + 2 * pi[:, None] + tl.arange(0, 2)[None, :]  # (PAIRS, 2) unit numbers
        u_in = ui < K // 16
        u_ok = n_ok[:, None, None] & u_in[None, :, :]
        rows = offs_n[:, None, None]
        meta = tl.load(meta_ptr + rows * stride_mn + ui[None, :, :], mask=u_ok, other=0).to(tl.int32)
        xt = tl.load(x_ptr + pid_m * stride_xm + (ui * 16)[:, :, None] + tl.arange(0, 16)[None, None, :],
                     mask=u_in[:, :, None], other=0.0).to(tl.float32)
        c0, c1, c2, c3 = quarters(tl.reshape(xt, (PAIRS, 2, 2, 2, 2, 2)))  # column 4h + c, h = 2a + b
        xa0, xa1, xa2, xa3 = quarters(c0)
        xb0, xb1, xb2, xb3 = quarters(c1)
        xc0, xc1, xc2, xc3 = quarters(c2)
        xd0, xd1, xd2, xd3 = quarters(c3)
        part = tl.zeros((BLOCK_N, PAIRS, 2), dtype=tl.float32)
        if INT4:
            words = tl.load(v_ptr + rows * stride_vn + ui[None, :, :], mask=u_ok, other=0)
            if GROUP >= BLOCK_K:
                s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
                s = s.to(tl.float32)[:, None, None]
            else:
                g = (ui * 16) // GROUP
                s = tl.load(s_ptr + rows * stride_sn + g[None, :, :],
                            mask=n_ok[:, None, None] & (g < G_COUNT)[None, :, :],
                            other=0.0).to(tl.float32)
            part = _group_term(part, meta, 0, _code(words, 0), _code(words, 1), xa0, xb0, xc0, xd0)
            part = _group_term(part, meta, 1, _code(words, 2), _code(words, 3), xa1, xb1, xc1, xd1)
            part = _group_term(part, meta, 2, _code(words, 4), _code(words, 5), xa2, xb2, xc2, xd2)
            part = _group_term(part, meta, 3, _code(words, 6), _code(words, 7), xa3, xb3, xc3, xd3)
            return acc_p + part * pow2(64) * s
        else:
            v = tl.load(v_ptr + rows[:, :, :, None] * stride_vn + (ui * 8)[None, :, :, None]
                        + tl.arange(0, 8)[None, None, None, :], mask=u_ok[:, :, :, None], other=0.0).to(tl.float32)
            t0, t1 = tl.split(tl.reshape(v, (BLOCK_N, PAIRS, 2, 2, 2, 2)))  # kept value u = 4a + 2b + c
            v0, v2, v4, v6 = quarters(t0)
            v1, v3, v5, v7 = quarters(t1)
            part = _group_term(part, meta, 0, v0, v1, xa0, xb0, xc0, xd0)
            part = _group_term(part, meta, 1, v2, v3, xa1, xb1, xc1, xd1)
            part = _group_term(part, meta, 2, v4, v5, xa2, xb2, xc2, xd2)
            part = _group_term(part, meta, 3, v6, v7, xa3, xb3, xc3, xd3)
            return acc_p + part * pow2(64)

    @triton.jit
    def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, G_COUNT, M_BUCKET,
                         stride_xm, stride_vn, stride_mn, stride_sn, stride_ym, stride_ps,
                         INT4: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         LOOP_STAGES: tl.constexpr, GEMV_MODE: tl.constexpr = 0):
        UNITS: tl.constexpr = BLOCK_K // 16  # a unit: 16 input columns, 8 kept values, 16 bits of metadata
        HALF: tl.constexpr = BLOCK_K // 2
        QUADS: tl.constexpr = BLOCK_K // 4
        ONE_GROUP: tl.constexpr = GROUP >= BLOCK_K
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_lo, k_hi = k_range(pid_k, K, SPLIT, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)    # GEMM
        acc_u = tl.zeros((BLOCK_N, UNITS), dtype=tl.float32)  # GEMV mode 1: a partial sum per unit slot
        acc_p = tl.zeros((BLOCK_N, BLOCK_K // 32, 2), dtype=tl.float32)  # GEMV mode 0: per unit of a pair
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):  # GEMV loads prefetched (cp.async)
            if BLOCK_M == 1 and GEMV_MODE == 0:
                acc_p = _gemv_pairs(acc_p, x_ptr, v_ptr, meta_ptr, s_ptr, k0, pid_m, offs_n, n_ok, K, G_COUNT,
                                    stride_xm, stride_vn, stride_mn, stride_sn, INT4, GROUP, BLOCK_N, BLOCK_K)
            else:
                ui = k0 // 16 + tl.arange(0, UNITS)
                cols = ui * 16
                u_ok = n_ok[:, None] & (ui[None, :] < K // 16)
                # kept value u of a unit sits in its group of 4 number u // 2, at position (meta >> 2u) & 3
                meta = tl.load(meta_ptr + offs_n[:, None] * stride_mn + ui[None, :], mask=u_ok, other=0).to(tl.int32)
                words = meta  # (unused unless INT4)
                s = tl.full((BLOCK_N, 1), 1.0, tl.float32)
                if INT4:
                    words = tl.load(v_ptr + offs_n[:, None] * stride_vn + ui[None, :], mask=u_ok, other=0)
                    scols = k0 + tl.arange(0, 1) if ONE_GROUP else cols
                    s = load_per_group(s_ptr, offs_n, n_ok, scols, G_COUNT, stride_sn, GROUP).to(tl.float32)
                # the tile's kept values (BLOCK_N, QUADS, 2) in stored order and their positions in the group
                if INT4:
                    u3 = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
                    v = tl.reshape(codes_to_float(u3, 8.0), (BLOCK_N, QUADS, 2))
                else:
                    vi = k0 // 2 + tl.arange(0, HALF)
                    v = tl.reshape(tl.load(v_ptr + offs_n[:, None] * stride_vn + vi[None, :],
                                           mask=n_ok[:, None] & (vi[None, :] < K // 2), other=0.0).to(tl.float32),
                                   (BLOCK_N, QUADS, 2))
                nib = tl.reshape((meta[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 0xF, (BLOCK_N, QUADS))
                pos = (nib[:, :, None] >> (tl.arange(0, 2) * 2)[None, None, :]) & 3
                x = load_x(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm)
                if BLOCK_M == 1:
                    # GEMV mode 1, by tiles: each value against the x of its column, picked by selects
                    even, odd = tl.split(tl.reshape(x.to(tl.float32), (QUADS, 2, 2)))  # columns {0, 2}, {1, 3}
                    x0, x2 = tl.split(even)
                    x1, x3 = tl.split(odd)
                    xs = tl.where(pos == 0, x0[None, :, None],
                                  tl.where(pos == 1, x1[None, :, None],
                                           tl.where(pos == 2, x2[None, :, None], x3[None, :, None])))
                    acc_u += tl.sum(tl.reshape(v * xs, (BLOCK_N, UNITS, 8)), axis=2) * s
                else:
                    # GEMM: the dense (BLOCK_N, BLOCK_K) tile built in registers, one tl.dot
                    v0, v1 = tl.split(v)
                    p0, p1 = tl.split(pos)
                    r = tl.arange(0, 4)[None, None, :]
                    dense = tl.where(p0[:, :, None] == r, v0[:, :, None],
                                     tl.where(p1[:, :, None] == r, v1[:, :, None], 0.0))
                    if INT4 and not ONE_GROUP:
                        dense = tl.reshape(tl.reshape(dense, (BLOCK_N, UNITS, 16)) * s[:, :, None],
                                           (BLOCK_N, BLOCK_K))
                    w = tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(x.dtype)
                    if INT4 and ONE_GROUP:
                        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION) * tl.trans(s)
                    else:
                        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if BLOCK_M == 1:
            if GEMV_MODE == 0:
                acc = tl.reshape(tl.sum(tl.sum(acc_p, axis=2), axis=1), (1, BLOCK_N))
            else:
                acc = tl.reshape(tl.sum(acc_u, axis=1), (1, BLOCK_N))
        store_tile(y_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, pid_k, stride_ym, stride_ps, SPLIT)

    # GEMV tiles. Mode 0 (pairs of units, everything prefetched): 2 units a thread of 2 to 8 rows.
    # Mode 1 (by tiles, one row a thread, selects): the GEMV measured at 1.05x bf16 on an H200 before.
    _sparse24_run = tuned(_sparse24_kernel, ["INT4"],
                          gemv_tiles=((64, 128, 2), (128, 128, 4), (128, 64, 2), (64, 256, 4),
                                      (16, 256, 4, {"GEMV_MODE": 1}), (8, 512, 4, {"GEMV_MODE": 1}),
                                      (32, 128, 4, {"GEMV_MODE": 1})))


def triton_sparse24(x: torch.Tensor, values_or_codes: torch.Tensor, meta: torch.Tensor,
                    scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a compressed 2:4 weight (int4 codes when ``scale`` is given);
    ``config`` fixes the tiles (BLOCK_M/N/K, SPLIT) instead of autotuning them."""
    if triton is None:
        raise RuntimeError("triton is not installed: use torch_sparse24, or pip install triton")
    check(x, values_or_codes, meta, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], meta.shape[0]
    v, meta16 = values_or_codes.contiguous(), meta.contiguous().view(torch.int16)  # 2 bytes: one 16-column unit
    s = scale.contiguous() if scale is not None else v
    groups = scale.shape[1] if scale is not None else 1
    y = launch(_sparse24_run, (x2, v, meta16, s), (groups,), (x2.stride(0), v.stride(0), meta16.stride(0), s.stride(0)),
               m, n, k, x, config, INT4=scale is not None, GROUP=group_constexpr(k, groups))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)

"""Float quantization formats: FP8 (e4m3), NVFP4 and MXFP4 (e2m1 values with block scales), and
dynamic per-token activation quantization (int8, fp8) as compressed-tensors defines them.

The element grids (every representable magnitude; the sign is a separate bit):
    e4m3 (float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; max 448, min subnormal 2^-9,
                          no infinities (0x7F/0xFF are NaN)
    e2m1 (fp4):           0, 0.5, 1, 1.5, 2, 3, 4, 6
Rounding is to the nearest value, ties to the even code (the one whose last mantissa bit is 0),
after clamping to the largest finite value: what the hardware's conversions and compressed-
tensors do. ``round_e2m1`` / ``round_e4m3`` are tested against a table of every code.

The weight formats (W of shape (out, in)):
    fp8 per-tensor / per-channel:  s = amax / 448            w_hat = e4m3(W / s) * s
    NVFP4, blocks of 16 columns:   g = 2^floor(log2(448 * 6 / amax(W)))          (fp32 tensor scale)
                                   s_b = e4m3_up(amax_b / 6 * g)                 (an fp8 scale per block)
                                   w_hat = e2m1(W / (s_b / g)) * (s_b / g)
    MXFP4, blocks of 32 columns:   s_b = 2^ceil(log2(amax_b / 6))                 (an e8m0 scale per block)
                                   w_hat = e2m1(W / s_b) * s_b
Each scale is the smallest one of its type at or above the block's need, so no weight is clipped
(the int formats' rule). NVFP4's tensor scale ``g`` is a power of two (ModelOpt uses 448*6/amax
itself): then s_b / g, e2m1 * (s_b / g) and the int formats' products are all exact in bf16, so
compressed-tensors' decompression, which runs in bf16, gives our weights bit for bit.

Storage (compressed-tensors' ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``): each e2m1 value
is a 4-bit code ``sign << 3 | index`` (index into the grid above); two codes per uint8, the even
column in the low nibble. MXFP4 scales are uint8 biased exponents (e + 127); NVFP4 scales are
float8_e4m3fn with ``weight_global_scale`` = g (the divisor) in fp32.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# boundary k lies between grid[k] and grid[k+1]; a tie goes to the even index
_E2M1_MIDS = ((E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2).tolist()


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest float8_e4m3fn value (ties to even), saturating at +-448; returned as x's dtype."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def e4m3_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float8_e4m3fn value at or above each (non-negative) element, capped at 448."""
    y = x.float().clamp(max=E4M3_MAX)
    r = y.to(torch.float8_e4m3fn)
    below = r.float() < y
    up = (r.view(torch.uint8) + 1).view(torch.float8_e4m3fn)  # positive codes are ordered as their values
    return torch.where(below, up.float(), r.float())


def e2m1_index(x: torch.Tensor) -> torch.Tensor:
    """Grid index (0..7) of |x| rounded to e2m1, ties to even, saturating at 6."""
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(_E2M1_MIDS):
        idx += (a >= mid if k % 2 else a > mid).to(torch.uint8)
    return idx


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    sign = torch.where(torch.signbit(x), -1.0, 1.0).to(x.dtype)
    return E2M1_GRID.to(x.device, x.dtype)[e2m1_index(x).long()] * sign


def pack_e2m1(x: torch.Tensor) -> torch.Tensor:
    """(rows, n) e2m1 values -> (rows, n / 2) uint8, two 4-bit codes (sign << 3 | index) per byte."""
    code = e2m1_index(x) | (torch.signbit(x).to(torch.uint8) << 3)
    return code[:, 0::2] | (code[:, 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)
    sign = torch.where((codes & 8).bool(), -1.0, 1.0)
    return E2M1_GRID.to(packed.device)[(codes & 7).long()] * sign


# ---------------------------------------------------------------- scale rules (from a block's amax)

def fp8_scale(amax: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """amax / 448 rounded up to a ``scale_dtype`` value (float32); 1 where amax is 0."""
    from compress.quant import representable

    return representable(torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)), scale_dtype)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """g = 2^floor(log2(448 * 6 / amax)) as a float32 (1,) tensor; 1 for an all-zero tensor."""
    g = torch.exp2(torch.floor(torch.log2(E4M3_MAX * E2M1_MAX / amax))) if amax > 0 else torch.ones(())
    return g.reshape(1).float()


def nvfp4_block_scale(amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The e4m3 values s_b (float32) stored per block; the block's scale is s_b / g."""
    return e4m3_up(amax / E2M1_MAX * g)


def mxfp4_exponent(amax: torch.Tensor) -> torch.Tensor:
    """int32 e, 2^e the smallest power of two >= amax / 6, in e8m0's range (-127 for an all-zero block)."""
    e = torch.ceil(torch.log2(amax / E2M1_MAX))
    e = torch.where(amax / torch.exp2(e) > E2M1_MAX, e + 1, e)  # log2's rounding, checked exactly
    return torch.where(amax > 0, e, torch.full_like(e, -127)).clamp(-127, 127).to(torch.int32)


def fp4_values(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e2m1(x / s), with a zero scale (an all-zero block) giving zeros."""
    return round_e2m1(x / torch.where(s > 0, s, 1) * (s > 0))


# ---------------------------------------------------------------- activations (dynamic, per token)

def act_qdq(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token (last dim) symmetric quantize-dequantize as compressed-tensors computes it:
    int8: s = amax / 127.5, q = clamp(round(x / s), -128, 127);  fp8: s = amax / 448, q = e4m3(x / s).
    (vLLM's int8 kernel divides by 127; the two differ by 0.4% in scale.) STE in the backward."""
    amax = x.detach().abs().amax(-1, keepdim=True)
    if kind == "int8":
        s = amax / 127.5
        s = torch.where(s > 0, s, torch.finfo(x.dtype).eps)
        q = torch.round(x.detach() / s).clamp(-128, 127)
    else:
        s = amax / E4M3_MAX
        s = torch.where(s > 0, s, torch.finfo(x.dtype).eps)
        q = round_e4m3(x.detach() / s)
    from compress.quant import ste

    return ste(x, q * s)

"""Float formats (FP8 e4m3, NVFP4, MXFP4), activation and KV-cache rounding: every representable
value, ties, packing, and agreement with the compressed-tensors library's own math."""

import pytest
import torch

from compress import quant_float as qf
from compress.formats import weight_format


def e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes) of every finite non-negative float8_e4m3fn code, ascending."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    return codes.view(torch.float8_e4m3fn).float(), codes


def nearest_even(x: torch.Tensor, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Brute force: the nearest table value to |x| (ties to the even code), with x's sign, saturating."""
    a = x.abs().clamp(max=values.max())[:, None]
    dist = (a - values[None]).abs()
    best = dist.min(1, keepdim=True).values
    tied = dist == best
    pick = torch.where(tied & (codes[None] % 2 == 0), 1, 0) + tied.int()  # even code wins a tie
    return values[pick.argmax(1)] * torch.where(torch.signbit(x), -1.0, 1.0)


def probes(values: torch.Tensor) -> torch.Tensor:
    """Every value, every midpoint (a tie), points just either side of each midpoint, and beyond the max."""
    mids = (values[1:] + values[:-1]) / 2
    eps = (values[1:] - values[:-1]) * 1e-3
    x = torch.cat([values, mids, mids - eps, mids + eps, values.max() * torch.tensor([1.01, 2.0, 1e6])])
    return torch.cat([x, -x])


def test_e4m3_rounding_matches_a_table_of_every_code():
    values, codes = e4m3_table()
    assert values.max() == 448 and len(values) == 127
    x = probes(values)
    torch.testing.assert_close(qf.round_e4m3(x), nearest_even(x, values, codes), rtol=0, atol=0)


def test_e2m1_rounding_matches_a_table_of_every_code():
    values, codes = qf.E2M1_GRID, torch.arange(8)
    x = probes(values)
    torch.testing.assert_close(qf.round_e2m1(x), nearest_even(x, values, codes), rtol=0, atol=0)


def test_e2m1_rounding_and_packing_agree_with_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    x = probes(qf.E2M1_GRID)[:, None].repeat(1, 2).reshape(-1, 2)[: 2 * (len(probes(qf.E2M1_GRID)) // 2)]
    x = x.reshape(4, -1)
    torch.testing.assert_close(qf.round_e2m1(x), FP4_E2M1_DATA.cast_to_fp4(x.clone()), rtol=0, atol=0)
    v = qf.round_e2m1(x)
    packed = qf.pack_e2m1(v)
    assert torch.equal(packed, pack_fp4_to_uint8(v))
    assert torch.equal(qf.unpack_e2m1(packed), v.float())
    assert torch.equal(unpack_fp4_from_uint8(packed, *v.shape, dtype=torch.float32), v.abs() * torch.sign(v))


def test_e4m3_up_is_the_smallest_code_at_or_above():
    values, _ = e4m3_table()
    x = torch.cat([values[:-1] + (values[1:] - values[:-1]) * 0.3, values])
    up = qf.e4m3_up(x)
    idx = torch.searchsorted(values, x)  # first table value >= x
    assert torch.equal(up, values[idx])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_block_scales_never_clip_and_are_the_smallest_that_do_not(fmt):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]
    f = weight_format(fmt)
    qp = f.quant_params(w)
    p, st = f.split(qp)
    scale = f._scale(p, st)  # (out, blocks)
    amax = f.grouped(w).abs().amax(-1)
    assert (amax / scale <= qf.E2M1_MAX).all()
    if fmt == "mxfp4":
        assert (amax / (scale / 2) > qf.E2M1_MAX).all()  # half the scale would clip: the power of two is the smallest
        assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    else:
        g = st["global_scale"]
        assert torch.equal(torch.log2(g), torch.log2(g).round())  # a power of two: bf16-exact block scales
        assert (p["block_scale"] <= 448).all() and torch.equal(qf.e4m3_up(p["block_scale"]), p["block_scale"])
    w_hat = f.qdq(w)
    assert torch.equal(w_hat.bfloat16().float(), w_hat)  # exact in bf16 (what compressed-tensors decompresses to)
    assert ((w_hat - w).abs() <= scale.repeat_interleave(f.block, 1) * 1.0 + 1e-12).all()  # <= half the widest step


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8", "fp8-tensor", "int4", "int8"])
def test_compressed_tensors_decompresses_our_tensors_to_our_weights(fmt):
    """The library's own compressor, fed our packed tensors and our config, gives back our weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    torch.manual_seed(1)
    w = torch.randn(48, 96) * 0.05
    f = {"fp8-tensor": weight_format("fp8", per_channel=False), "int4": weight_format("int", 4, 32),
         "int8": weight_format("int", 8, None)}.get(fmt) or weight_format(fmt)
    tensors = f.pack(w, torch.float32, f.quant_params(w))
    scheme = QuantizationScheme(targets=["Linear"], weights=f.ct_scheme())
    compressor = BaseCompressor.load_from_registry(f.ct_format)
    back = compressor.decompress(tensors, scheme)["weight"]
    assert torch.equal(back.float(), f.qdq(w))


def ct_module() -> torch.nn.Module:
    """A module as compressed-tensors' forward expects one (its scales set by the caller)."""
    from compressed_tensors.quantization import QuantizationStatus

    m = torch.nn.Module()
    m.quantization_status = QuantizationStatus.FROZEN
    return m


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_dynamic_activation_rounding_equals_compressed_tensors_forward(kind):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    torch.manual_seed(2)
    x = torch.randn(3, 7, 64) * torch.logspace(-2, 2, 7)[None, :, None]
    args = QuantizationArgs(num_bits=8, type="int" if kind == "int8" else "float", symmetric=True, dynamic=True,
                            strategy="token")
    theirs = forward_quantize(ct_module(), x.clone(), "input", args)
    ours = qf.act_qdq(x.clone().requires_grad_(), kind)
    assert torch.equal(ours, theirs)
    ours.sum().backward()  # straight through


@pytest.mark.parametrize("kind,per_head", [("fp8", False), ("fp8", True), ("int8", False)])
def test_kv_rounding_equals_compressed_tensors_static_quantization(kind, per_head):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from compress.kv_quant import KVSpec, kv_qdq

    torch.manual_seed(3)
    k = torch.randn(2, 3, 5, 16) * 4
    spec = KVSpec(kind, per_head)
    scale = (k.abs().amax((0, 2, 3)).reshape(3, 1, 1) if per_head else k.abs().amax().reshape(1)) / spec.qmax
    args = QuantizationArgs(**spec.ct_scheme())
    holder = ct_module()
    holder.k_scale = torch.nn.Parameter(scale, requires_grad=False)
    assert torch.equal(kv_qdq(k, scale, spec), forward_quantize(holder, k.clone(), "k", args))


def test_straight_through_returns_the_rounded_value_exactly_in_bf16():
    from compress.quant import ste

    w = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)
    w_hat = weight_format("fp8").qdq(w[None])[0].bfloat16()
    out = ste(w, w_hat)
    assert torch.equal(out, w_hat)  # w + (w_hat - w) would round in bf16
    out.float().pow(2).sum().backward()
    torch.testing.assert_close(w.grad, 2 * w_hat)

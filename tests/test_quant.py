"""Integer quantization math: quantize/dequantize against a per-group loop reference, the
straight-through gradient, pack/unpack round trips, and the packed layout equal to the
compressed-tensors library's own (the real library, both directions)."""

import dataclasses

import pytest
import torch

from compress.errors import CompressError
from compress.quant import IntSpec, dequantize, fake_quant, pack_int32, quantize, representable, unpack_int32

SHAPES = [(8, 64), (5, 96), (3, 576)]  # (out, in); 5 x 96: odd rows, 3 groups of 32


def reference(w, spec):
    """Per group, written out with Python scalars: the formula of compress/quant.py's docstring."""
    g = spec.group_size or w.shape[1]
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0:c0 + g].tolist()
            if spec.symmetric:
                lo, hi = -min(min(x), 0.0), max(max(x), 0.0)
                scale, zero = (lo / -spec.qmin if lo > hi else hi / spec.qmax), 0.0
            else:
                lo, hi = min(min(x), 0.0), max(max(x), 0.0)
                scale = (hi - lo) / (spec.qmax - spec.qmin)
                zero = min(max(spec.qmin - round(lo / scale), spec.qmin), spec.qmax) if scale > 0 else 0.0
            scale = scale if scale > 0 else 1.0
            scale = float(representable(torch.tensor([scale]), spec.scale_dtype))  # rounded up to a bf16 value
            if not spec.symmetric and scale != 1.0:
                zero = min(max(spec.qmin - round(lo / scale), spec.qmin), spec.qmax)
            for j, v in enumerate(x):
                q = min(max(round(v / scale) + zero, spec.qmin), spec.qmax)
                out[r, c0 + j] = (q - zero) * scale
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", [IntSpec(8, None, True), IntSpec(4, 32, True), IntSpec(4, 32, False),
                                  IntSpec(4, None, False), IntSpec(8, 32, False)], ids=repr)
def test_quantize_dequantize_matches_the_reference(shape, spec):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :4] = 0.0  # zeros and a tied max
    q, scale, zero = quantize(w, spec)
    assert q.dtype == torch.int8 and int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    w_hat = dequantize(q, scale, zero, spec)
    torch.testing.assert_close(w_hat, reference(w, spec), rtol=0, atol=1e-7)
    # round to nearest: never further than half a step from the weight, but for the values beyond qmax
    # (symmetric, when the group's largest magnitude is negative), which clip by less than one step
    g = spec.group_size or shape[1]
    step = scale.repeat_interleave(g, dim=1)
    clipped = w > step * (spec.qmax + 0.5) if spec.symmetric else torch.zeros_like(w, dtype=torch.bool)
    assert ((w - w_hat).abs() <= torch.where(clipped, step, step / 2) + 1e-7).all()
    # with unrounded (fp32) scales, quantizing the dequantized weight again is exact (a fixed point);
    # bf16 scales are rounded up, so there the largest weight may land one step below qmax
    f32 = dataclasses.replace(spec, scale_dtype=torch.float32)
    again = dequantize(*quantize(w, f32), f32)
    torch.testing.assert_close(dequantize(*quantize(again, f32), f32), again, rtol=0, atol=1e-7)


def test_all_zero_group_is_exact():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    for spec in (IntSpec(4, 32, True), IntSpec(4, 32, False)):
        w_hat = dequantize(*quantize(w, spec), spec)
        assert torch.equal(w_hat[:, :32], w[:, :32]) and torch.equal(w_hat[0], w[0])


def test_fake_quant_forward_is_dequantized_and_gradient_passes_straight_through():
    spec = IntSpec(4, 32, False)
    w = (torch.randn(4, 64) * 0.1).requires_grad_()
    out = fake_quant(w, spec)
    torch.testing.assert_close(out.detach(), dequantize(*quantize(w, spec), spec))
    upstream = torch.randn(4, 64)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 70, 576])
def test_pack_unpack_round_trip(bits, n):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (5, n), generator=torch.Generator().manual_seed(bits * n)).to(torch.int8)
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-n * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, n), q)


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("n", [64, 96, 70])
def test_packed_layout_is_compressed_tensors(bits, n):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, n),
                      generator=torch.Generator().manual_seed(n)).to(torch.int8)
    ours = pack_int32(q, bits)
    assert torch.equal(ours, pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(ours, bits, q.shape), q)


def test_group_that_does_not_divide_the_row_is_refused_with_a_fix():
    with pytest.raises(CompressError, match="group_size 128 does not divide q_proj's 576 input features; use 32 or 64"):
        IntSpec(4, 128).groups(576, "q_proj")
    with pytest.raises(CompressError, match="bits"):
        IntSpec(5, 32).groups(64)


@pytest.mark.parametrize("spec", [IntSpec(4, 64, True), IntSpec(4, 32, False), IntSpec(8, None, True)], ids=repr)
def test_bf16_export_weights_equal_the_fake_quant_weights_cast_to_bf16(spec):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.03
    q, scale, zero = quantize(w, spec)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # every scale is a bf16 value
    fp32 = dequantize(q, scale, zero, spec)
    in_bf16 = ((q.to(torch.bfloat16) - zero.to(torch.bfloat16).repeat_interleave(w.shape[1] // scale.shape[1], 1))
               * scale.to(torch.bfloat16).repeat_interleave(w.shape[1] // scale.shape[1], 1))
    assert torch.equal(in_bf16, fp32.to(torch.bfloat16))
    if spec.symmetric:  # the grid holds each group's largest magnitude; the other sign clips by < 1 step
        s = scale.repeat_interleave(w.shape[1] // scale.shape[1], 1)
        assert ((s * spec.qmin <= w) & (w < s * (spec.qmax + 1))).all()
        m = w.reshape(len(w), scale.shape[1], -1).abs().amax(-1)
        assert (m <= torch.maximum(scale * spec.qmax, scale * -spec.qmin)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_scale_uses_qmin_for_a_negative_extreme(bits):
    spec = IntSpec(bits, 32, True, scale_dtype=torch.float32)
    w = torch.linspace(-0.5, 0.5, 64).reshape(2, 32)
    w[0, 3], w[0, 4], w[1, 7] = -1.0, 0.99, 1.0  # row 0: the extreme is negative; row 1: positive
    q, scale, _ = quantize(w, spec)
    assert scale[0, 0] == 1.0 / -spec.qmin and int(q[0, 3]) == spec.qmin  # -8 used: a grid 8/7 finer (int4)
    assert int(q[0, 4]) == spec.qmax  # the smaller positive extreme clips to qmax (within one step)
    assert scale[1, 0] == 1.0 / spec.qmax and int(q[1, 7]) == spec.qmax


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("shape", [(4, 64), (7, 96), (3, 576)], ids=str)
def test_gguf_blocks_round_exactly_as_the_gguf_package(kind, shape):
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from compress.quant import gguf_dequantize, gguf_fake_quant, gguf_quantize, pack_gguf

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02
    w[0, :32] = 0.0  # an all-zero block
    w[1, 40] = -w[1, 32:64].abs().max() * 1.5  # a negative maximum (Q4_0's signed d)
    w[2, :8] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 0.25, -0.75, 127.0]) / 127  # halves: roundf ties
    qtype = GGMLQuantizationType.Q8_0 if kind == "q8_0" else GGMLQuantizationType.Q4_0
    their_bytes = quants.quantize(w.numpy(), qtype)
    theirs = quants.dequantize(their_bytes, qtype)
    ours = gguf_dequantize(*gguf_quantize(w, kind))
    assert np.array_equal(ours.numpy(), theirs.reshape(shape))
    assert torch.equal(gguf_fake_quant(w, kind), ours)
    # our packing of our blocks is the package's file bytes (the GGUF export writes these)
    packed = pack_gguf(*gguf_quantize(w, kind), kind)
    assert packed.dtype == np.uint8 and np.array_equal(packed, their_bytes)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_bytes_of_gptq_blocks_dequantize_to_gptq_weights(kind):
    """GPTQ fixes each block's d when the block comes up and then moves the block's later values,
    so re-rounding its result by ggml's rule gives other blocks: the export packs GPTQ's own values
    and d, and the gguf package reads back GPTQ's weight exactly. Values a fixed d would put
    beyond Q8_0's +-127 are clamped (the fake-quant forward does the same)."""
    from gguf import GGMLQuantizationType, quants

    from compress.formats import weight_format
    from compress.gptq import gptq
    from compress.quant import gguf_quantize, pack_gguf

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 128, generator=g), torch.randn(256, 128, generator=g) * torch.rand(128, generator=g) * 3
    fmt = weight_format(f"gguf_{kind}")
    r = gptq(w, 2 * x.T @ x, fmt)
    q, p, _ = fmt.values(r.latent, r.params)
    qtype = GGMLQuantizationType.Q8_0 if kind == "q8_0" else GGMLQuantizationType.Q4_0
    back = torch.from_numpy(quants.dequantize(pack_gguf(q, p["d"], kind), qtype)).reshape(w.shape)
    assert torch.equal(back, r.quantized)
    assert not torch.equal(back, fmt.qdq(r.quantized))  # what re-rounding the materialized weight writes
    # a fixed d at half of ggml's puts values beyond the format's range: they clamp to its ends
    q0, d0 = gguf_quantize(w, kind)
    lo, hi = (-127, 127) if kind == "q8_0" else (-8, 7)
    clamped = fmt.values(w, {"d": d0.float() / 2})[0]
    assert clamped.min() == lo and clamped.max() == hi
    with pytest.raises(CompressError, match="values are in"):  # codes the format cannot hold are refused
        pack_gguf(q0.float() * 2, d0, kind)

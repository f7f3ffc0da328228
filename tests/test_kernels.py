"""The Triton kernels against their PyTorch references (in Triton's interpreter on CPU), on the
layouts our exports write, and kernel-backed models loaded from real exports."""

import pytest
import torch

triton = pytest.importorskip("triton")

from compress.quant import IntSpec, pack_int32, quantize  # noqa: E402
from compress.sparsity import nm_mask, pack_24  # noqa: E402
from kernels import selftest  # noqa: E402
from kernels.sparse24 import triton_sparse24  # noqa: E402
from kernels.wna16 import triton_wna16  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_selftest_passes_on_its_default_shapes(dtype):
    lines = []
    assert selftest.run(selftest.parse_shapes(selftest.DEFAULT_SHAPES), dtype, "cpu", out=lines.append) == 0
    assert any("skipped: group 128 does not divide K=576" in line for line in lines)
    assert sum(" ok" in line for line in lines) >= 35


def test_selftest_reports_a_mismatch_with_a_nonzero_exit():
    lines = []
    assert selftest.run([(3, 40, 128)], torch.float32, "cpu", out=lines.append, tolerance=0.0) == 1
    assert any("MISMATCH" in line for line in lines)


@pytest.mark.parametrize("m,n,k,group,bits", [(1, 70, 576, 64, 4), (7, 33, 128, 32, 4), (16, 64, 1536, None, 8),
                                              (5, 40, 256, 128, 4)])
def test_wna16_on_our_export_layout_equals_the_dequantized_matmul(m, n, k, group, bits):
    torch.manual_seed(0)
    w, x = torch.randn(n, k) * 0.05, torch.randn(m, k)
    spec = IntSpec(bits, group, True)
    q, scale, _ = quantize(w, spec)
    w_hat = (q.float().reshape(n, -1, group or k) * scale[..., None]).reshape(n, k)
    y = triton_wna16(x, pack_int32(q, bits), scale, None, bits)
    torch.testing.assert_close(y, x @ w_hat.t(), rtol=1e-5, atol=1e-5)


def test_sparse24_on_our_export_layout_equals_the_dense_matmul():
    torch.manual_seed(0)
    n, k = 72, 576
    mask = nm_mask(torch.rand(n, k), 2, 4)
    w, x = torch.randn(n, k) * mask, torch.randn(3, k)
    values, meta = pack_24(w, mask)
    torch.testing.assert_close(triton_sparse24(x, values, meta), x @ w.t(), rtol=1e-5, atol=1e-5)
    q, scale, _ = quantize(w, IntSpec(4, 64, True))
    codes, meta = pack_24(q.float(), mask)
    w_hat = (q.float().reshape(n, -1, 64) * scale[..., None]).reshape(n, k)
    y = triton_sparse24(x, pack_int32(codes.to(torch.int8), 4), meta, scale)
    torch.testing.assert_close(y, x @ w_hat.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: triton_wna16(torch.randn(2, 96), torch.zeros(8, 12, dtype=torch.int32), torch.ones(8, 5), None, 4),
     "does not fit N=8, K=96"),
    (lambda: triton_wna16(torch.randn(2, 64), torch.zeros(8, 8, dtype=torch.int32), torch.ones(8, 1), None, 3),
     "W3A16 is not supported"),
    (lambda: triton_sparse24(torch.randn(2, 72), torch.zeros(8, 36), torch.zeros(8, 9, dtype=torch.uint8)),
     "must be a multiple of 16"),
    (lambda: triton_wna16(torch.randn(2, 96), torch.zeros(8, 12, dtype=torch.int32), torch.ones(8, 2), None, 4),
     "group size 48 is not supported by the kernels: use a power of two"),
])
def test_shapes_a_kernel_cannot_take_fail_in_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernel_model_from_a_2_4_int4_export_computes_the_exported_logits(tmp_path):
    """sparsify -> quantize (in process), exported as the run would; the kernel model (2:4 x int4
    file) and transformers' own decompression of the export agree."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from compress.export import export_model
    from compress.methods.qat import WeightQuant, quantize_linears
    from compress.methods.sparsify import SparsifyStage, sparse24_tensors, sparsify
    from eval.kernel_model import load_kernel_model
    from kernels.modules import Sparse24LinearKernel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    sparsify(model, SparsifyStage(method="magnitude"))
    quantize_linears(model, WeightQuant(bits=4, group_size=32))

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    out = export_model(model, NoTokenizer(), tmp_path / "final", {})
    save_file(sparse24_tensors(model, torch.float32), str(out / "sparse24.safetensors"))
    ours = load_kernel_model(out)
    assert ours.config.kernel_modules == 14 and isinstance(ours.model.layers[1].mlp.down_proj, Sparse24LinearKernel)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,tiles", [(1, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 3,
                                          "LOOP_STAGES": 3}),
                                     (4, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 2,
                                          "LOOP_STAGES": 3}),
                                     (20, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 1,
                                           "LOOP_STAGES": 3})])
def test_the_autotuned_path_adds_exactly_the_chosen_configs_partial_sums(monkeypatch, m, tiles):
    """CUDA's launch path (an autotuner picks tiles and split; decode writes fp32 partials into
    MAX_SPLIT slots, and the last program of each tile adds the chosen config's), run here through
    a real one-config Triton autotuner: summing any other number of slots, or unwritten ones, fails."""
    from kernels import sparse24, wna16
    from kernels.selftest import random_meta, random_packed
    from kernels.sparse24 import torch_sparse24
    from kernels.wna16 import torch_wna16

    def one_config(kernel):
        return triton.autotune(configs=[triton.Config(tiles)], key=["M_BUCKET", "N", "K"])(kernel)

    monkeypatch.setattr(wna16, "_wna16_run", one_config(wna16._wna16_kernel))
    monkeypatch.setattr(sparse24, "_sparse24_run", one_config(sparse24._sparse24_kernel))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 256, generator=g)
    packed, scale = random_packed(40, 256, 4, g), torch.rand(40, 4, generator=g) * 0.02
    torch.testing.assert_close(triton_wna16(x, packed, scale, None, 4), torch_wna16(x, packed, scale, None, 4),
                               rtol=1e-5, atol=1e-5)
    codes, meta = random_packed(40, 128, 4, g), random_meta(40, 256, g)
    torch.testing.assert_close(triton_sparse24(x, codes, meta, scale), torch_sparse24(x, codes, meta, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,tiles", [(1, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 3}),
                                     (5, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 4})])
def test_split_k_is_finished_in_the_kernel_from_this_calls_partials(m, tiles):
    """Split K in one launch: each tile's last program adds the SPLIT partial sums and stores y, then
    puts its arrival count back to 0. Two calls in a row on different x: a count left behind (the
    second call's tiles never finish), or a sum over the wrong slots, gives a wrong y. (The
    interpreter runs programs one after another, so the race a GPU could expose, a tile finished
    before its last partial landed, is checked on CUDA: the self-test's split-K shapes.)"""
    from kernels import tiles as shared
    from kernels.selftest import random_meta, random_packed
    from kernels.sparse24 import torch_sparse24
    from kernels.wna16 import torch_wna16

    g = torch.Generator().manual_seed(1)
    packed, scale = random_packed(48, 320, 4, g), torch.rand(48, 5, generator=g) * 0.02
    codes, meta = random_packed(48, 160, 4, g), random_meta(48, 320, g)
    for _ in range(2):
        x = torch.randn(m, 320, generator=g)
        torch.testing.assert_close(triton_wna16(x, packed, scale, None, 4, config=tiles),
                                   torch_wna16(x, packed, scale, None, 4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(triton_sparse24(x, codes, meta, scale, config=tiles),
                                   torch_sparse24(x, codes, meta, scale), rtol=1e-5, atol=1e-5)
        assert not shared._counts(x.device, 1).any()  # every tile's count is back at 0


@pytest.mark.parametrize("bits,zero", [(4, True), (8, False)], ids=["w4-asym", "w8"])
def test_gemv_holds_fp32_accuracy_from_tiny_to_large_activations(bits, zero):
    """The GEMVs scale x by powers of two up to 2^85 against codes and metadata bits read as fp32
    denormals (products at 2^-64): activations from 1e-6 to 6e4 (fp16's range) neither overflow nor
    lose precision. A wrong exponent gives inf or a far-off result; a flush of denormals gives 0."""
    from kernels.selftest import random_meta, random_packed
    from kernels.sparse24 import torch_sparse24
    from kernels.wna16 import torch_wna16

    g = torch.Generator().manual_seed(0)
    k = 256
    x = torch.randn(1, k, generator=g) * torch.logspace(-6, 4.8, k)[torch.randperm(k, generator=g)]
    packed, scale = random_packed(48, k, bits, g), torch.rand(48, 4, generator=g) * 0.02
    z = torch.randint(-4, 4, (48, 4), generator=g, dtype=torch.int8) if zero else None
    want = torch_wna16(x, packed, scale, z, bits)
    assert torch.isfinite(want).all() and want.abs().max() > 1e3
    torch.testing.assert_close(triton_wna16(x, packed, scale, z, bits), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    codes, meta = random_packed(48, k // 2, 4, g), random_meta(48, k, g)
    values = torch.randn(48, k // 2, generator=g)
    for v, s in ((values, None), (codes, scale)):
        want = torch_sparse24(x, v, meta, s)
        torch.testing.assert_close(triton_sparse24(x, v, meta, s), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("args,most", [(["wna16", "--tiles", "1x256x128", "--warps", "4"], 3.6),
                                       (["wna16", "--tiles", "1x64x128", "--warps", "2", "--bits", "8"], 4.1),
                                       (["sparse24", "--tiles", "1x64x128", "--warps", "2"], 11.5)],
                         ids=["w4-256x128", "w8-64x128", "2:4-64x128"])
def test_gemv_codegen_stays_within_its_instruction_budget(args, most):
    """Decode GEMV speed is bound by instructions per weight (an H200 issues ~3.3e13 thread
    instructions/s against 9.6e12 int4 values/s of HBM bandwidth): the sm_90 SASS of the GEMV's K
    loop, assembled here with the ptxas Triton ships (no GPU), stays within what it was when measured
    (3.35, 3.84 and 10.9 SASS instructions a value). A change that unpacks codes again, reloads x per
    row or spills registers fails this before any GPU sees it."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "nvdisasm").exists():
        pytest.skip("this Triton install has no ptxas / nvdisasm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "scripts/kernel_ptx.py"), *args, "--split", "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    found = re.search(r"(\d+) bytes spilled; K loop \d+ instructions for \d+ values a thread = ([\d.]+) a value",
                      out.stdout)
    assert found, out.stdout + out.stderr
    assert int(found.group(1)) == 0 and float(found.group(2)) <= most, out.stdout


def test_kernel_module_falls_back_to_the_reference_for_a_shape_the_kernel_refuses(caplog):
    """A group size the kernels do not take (48: not a power of two) gives the reference's result
    through the module, and says why once, however many calls."""
    from kernels import modules
    from kernels.modules import QuantLinearKernel
    from kernels.selftest import random_packed
    from kernels.wna16 import torch_wna16

    g = torch.Generator().manual_seed(0)
    packed, scale = random_packed(24, 192, 4, g), torch.rand(24, 4, generator=g) * 0.02  # K 192 / 4 groups = 48
    layer = QuantLinearKernel(packed, scale, None, 4, None)
    x = torch.randn(3, 192, generator=g)
    modules._said.clear()
    with caplog.at_level("WARNING", logger="kernels"):
        for _ in range(2):
            torch.testing.assert_close(layer(x), torch_wna16(x, packed, scale, None, 4))
    said = [r.getMessage() for r in caplog.records if "reference path" in r.getMessage()]
    assert len(said) == 1 and "group size 48" in said[0]


def test_prefill_does_not_need_split_k_counters():
    """Only split-K launches count arrivals: a prefill (M > 16, never split) larger than the counter
    buffer (M x N / 8 tiles) still runs the kernel, not the reference fallback."""
    from kernels import tiles
    from kernels.selftest import random_packed
    from kernels.wna16 import torch_wna16

    g = torch.Generator().manual_seed(0)
    packed, scale = random_packed(64, 64, 4, g), torch.rand(64, 1, generator=g) * 0.02
    x = torch.randn(40, 64, generator=g)
    saved = tiles.COUNTERS
    try:
        tiles.COUNTERS = 16  # fewer than 40 x 64 / 8 tiles
        y = triton_wna16(x, packed, scale, None, 4, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 1})
        with pytest.raises(ValueError, match="split-K counters"):
            triton_wna16(x[:3], packed, scale, None, 4, config={"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": 2})
    finally:
        tiles.COUNTERS = saved
    torch.testing.assert_close(y, torch_wna16(x, packed, scale, None, 4), rtol=1e-5, atol=1e-5)

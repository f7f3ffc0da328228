"""QAT and PTQ stages on tiny models: fake-quant linears, stage results that round-trip, and an
export that plain transformers (with compressed-tensors) loads back to the same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.methods.qat import QuantLinear, WeightQuant, quantize_linears
from compress.modelio import load_stage_model, save_stage_model
from compress.quant import IntSpec, dequantize, quantize
from tests.tiny import launch, write_recipe


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def test_quant_linear_forward_uses_the_dequantized_weight_and_survives_a_stage_round_trip(tmp_path):
    model = tiny()
    swapped = quantize_linears(model, WeightQuant(bits=4, group_size=32))
    assert len(swapped) == 14 and type(model.lm_head) is torch.nn.Linear  # lm_head ignored by default
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    w_hat = dequantize(*quantize(q.weight, IntSpec(4, 32)), IntSpec(4, 32))
    torch.testing.assert_close(q(x), x @ w_hat.t())
    ids = torch.randint(0, 300, (2, 12))
    save_stage_model(model, tmp_path / "m")
    back = load_stage_model(tmp_path / "m")
    assert isinstance(back.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)



@pytest.mark.slow
@pytest.mark.parametrize("stage", [
    {"kind": "qat", "weights": {"bits": 4, "group_size": 32}, "max_steps": 4},
    {"kind": "quantize", "weights": {"bits": 8, "group_size": None}},
    {"kind": "quantize", "method": "gptq", "gptq": {"calibration_blocks": 8}, "weights": {"bits": 4, "group_size": 32}},
    {"kind": "quantize", "method": "gptq", "gptq": {"calibration_blocks": 8}, "weights": {"bits": 4, "group_size": 32},
     "blockwise": {"calibration_blocks": 8, "epochs": 3}},
    {"kind": "quantize", "awq": {"calibration_blocks": 8}, "method": "gptq", "gptq": {"calibration_blocks": 8},
     "weights": {"bits": 4, "group_size": 32}},
], ids=["qat-int4-g32", "ptq-int8-channel", "gptq-int4-g32", "gptq-blockwise-int4-g32", "awq-gptq-int4-g32"])
def test_quantized_run_exports_compressed_tensors_with_the_same_logits(tiny_teacher, tmp_path, stage):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[stage])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    if "blockwise" in stage:  # the layers were trained towards the original's outputs
        info = json.loads((out / "stages/0-quantize/transform.json").read_text())
        assert info["blockwise_tokens"] > 0 and info["blockwise_error_after"] < info["blockwise_error_before"]
    if "awq" in stage:  # scales were searched and folded into the model that is exported
        info = json.loads((out / "stages/0-quantize/transform.json").read_text())
        assert info["awq_tokens"] > 0 and 0 < info["awq_alpha_mean"] and info["awq_error_ratio"] < 1
    config = json.loads((out / "final/config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == stage["weights"]["bits"]
    ours = load_stage_model(out / f"stages/0-{stage['kind']}/model")  # the fake-quant model the run ended with
    exported = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(exported.generate(ids[:1, :8], **gen), ours.generate(ids[:1, :8], **gen))  # and decodes alike
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["final"]["kl"] > 0  # quantization changed the model ...
    teacher_bytes = summary["table"][0]["bytes_on_disk"]
    assert summary["table"][-1]["bytes_on_disk"] < teacher_bytes  # ... and made it smaller


@pytest.mark.parametrize("weights,message", [
    ({"bits": 4, "group_size": 128}, "group_size 128 does not divide q_proj's 64 input features"),
    ({"bits": 4, "targets": ["qkv_proj"]}, "match no linear"),
    ({"bits": 4, "symmetric": False}, "asymmetric weights cannot be exported as compressed-tensors"),
    ({"bits": 3}, "bits"),
    ({"format": "int", "per_tensor": True}, "per_tensor applies to format: fp8"),
    ({"format": "fp8", "activations": "fp8", "export": "dequantized"}, "use export: compressed-tensors"),
    ({"format": "nvfp4", "symmetric": False}, "nvfp4 is symmetric"),
    ({"format": "mxfp4", "learn_scales": True}, "learn_scales applies to format: int"),
])
def test_bad_quantization_input_fails_before_anything_is_written(tiny_teacher, tmp_path, weights, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "qat", "weights": weights}])
    p = launch(recipe)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gguf_teacher(tiny_teacher, tmp_path_factory):
    """The tiny teacher as a GGUF file (Q8_0), written by our own writer: a GGUF export carries
    the tokenizer metadata of the teacher's GGUF."""
    from compress.gguf_export import write_gguf
    from compress.models import resolve_source

    src = resolve_source("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "q8_0", f"{src.directory}/{src.gguf_file}")


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_file_loads_back_with_the_weights_of_the_block_rounding(tiny_teacher, tmp_path, kind):
    """Our writer + transformers' GGUF loader: the q/k permutation, names and metadata round-trip."""
    import copy

    from compress.gguf_export import write_gguf
    from compress.models import resolve_source
    from compress.quant import gguf_dequantize, gguf_quantize

    src = resolve_source("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    path = write_gguf(model, tmp_path / f"m-{kind}.gguf", kind, f"{src.directory}/{src.gguf_file}")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(gguf_dequantize(*gguf_quantize(m.weight, kind)))
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [
    {"kind": "qat", "weights": {"format": "gguf_q4_0"}, "max_steps": 3},
    # GPTQ's block scales are fixed when each block comes up, so its compensated values do not round back
    # to them from the materialized weight: the file must hold GPTQ's own blocks
    {"kind": "quantize", "method": "gptq", "gptq": {"calibration_blocks": 4}, "weights": {"format": "gguf_q4_0"}},
    {"kind": "qat", "method": "gptq", "gptq": {"calibration_blocks": 4}, "weights": {"format": "gguf_q8_0"},
     "max_steps": 2},
], ids=["qat", "gptq", "qat_from_gptq_q8_0"])
def test_qat_for_gguf_exports_a_gguf_with_the_trained_weights(gguf_teacher, tmp_path, stage):
    from compress.models import load_tokenizer

    recipe = write_recipe(tmp_path / "r.yaml", gguf_teacher, tmp_path / "out", teacher={"source": str(gguf_teacher)},
                          student={"init": "teacher"}, stages=[stage])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out, kind = tmp_path / "out", stage["weights"]["format"][5:]
    assert (out / f"final/model-{kind}.gguf").is_file()
    ours = load_stage_model(out / f"stages/0-{stage['kind']}/model")
    assert ours.model.layers[0].mlp.up_proj.opts["fmt"] == f"gguf_{kind}"
    back = AutoModelForCausalLM.from_pretrained(out / "final", gguf_file=f"model-{kind}.gguf", dtype=torch.float32)
    ids = load_tokenizer(str(gguf_teacher))("def main():\n    return 0", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights,message", [
    ({"format": "gguf_q4_0"}, "copies the tokenizer from the teacher's GGUF file"),
    ({"format": "int", "export": "gguf"}, "a GGUF file holds GGUF blocks"),
])
def test_bad_gguf_requests_fail_in_one_line(tiny_teacher, tmp_path, weights, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "quantize", "weights": weights}])
    p = launch(recipe, "--dry-run")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def export_and_reload(model, tmp_path, dtype=torch.float32):
    from compress.export import export_model

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    out = export_model(model, NoTokenizer(), tmp_path / "export", {})
    return out, AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


@pytest.mark.parametrize("weights", [
    {"format": "fp8"}, {"format": "fp8", "per_tensor": True}, {"format": "nvfp4"}, {"format": "mxfp4"},
    {"bits": 8, "group_size": None, "activations": "int8"}, {"format": "fp8", "activations": "fp8"},
], ids=["fp8-channel", "fp8-tensor", "nvfp4", "mxfp4", "w8a8-int8", "w8a8-fp8"])
def test_float_and_w8a8_exports_reload_with_the_fake_quant_logits(tmp_path, weights):
    """transformers + compressed-tensors load our export and compute what our fake-quant model does
    (activation quantization included: the library applies it from the config)."""
    model = tiny()
    quantize_linears(model, WeightQuant(**weights))
    fp4 = weights.get("format") in ("nvfp4", "mxfp4")
    dtype = torch.bfloat16 if fp4 else torch.float32  # the library decompresses fp4 to bf16 (our values are exact there)
    if fp4:
        model.model.layers.to(dtype), model.model.embed_tokens.to(dtype), model.model.norm.to(dtype)
    out, back = export_and_reload(model, tmp_path, dtype)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qconfig["config_groups"]["group_0"]["input_activations"] is not None) == ("activations" in weights)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        ours = model.model.layers[1].mlp.down_proj.quantized_weight()
        assert torch.equal(back.model.layers[1].mlp.down_proj.weight.float(), ours.float())


def assert_same_after_stage_and_export(model, ids, tmp_path):
    """The stage round trip (our format) and the export reloaded by transformers give ``model``'s logits exactly."""
    save_stage_model(model, tmp_path / "m")
    back = load_stage_model(tmp_path / "m")
    _, exported = export_and_reload(model, tmp_path)
    with torch.no_grad():
        for other in (back, exported):
            torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    from compress.formats import weight_format
    from compress.gptq import gptq

    torch.manual_seed(0)
    mix = torch.randn(128, 128) / 128 ** 0.5 + torch.eye(128)
    x = torch.randn(4096, 128) @ mix * torch.linspace(0.2, 3, 128)  # correlated, uneven columns
    w = torch.randn(64, 128) * 0.05
    H = 2 * x.t() @ x / len(x)
    for name, fmt in [("int4 g32", weight_format("int", 4, 32)), ("nvfp4", weight_format("nvfp4")),
                      ("int4 channel", weight_format("int", 4, None)), ("gguf q4_0", weight_format("gguf_q4_0"))]:
        rtn = (x @ (fmt.qdq(w) - w).t()).pow(2).mean()
        for act_order in (False, True):
            qp, q, latent, _ = gptq(w, H, fmt, act_order=act_order)
            assert torch.equal(fmt.qdq(q, qp), q), name  # the result lies on the format's grid with the params returned
            assert torch.equal(fmt.qdq(latent, qp), q), name  # and is what the latent weight rounds to
            assert (latent - q).abs().max() > 0, name  # which is not on the grid itself
            err = (x @ (q - w).t()).pow(2).mean()
            assert err < 0.85 * rtn, (name, act_order, float(err), float(rtn))  # measured 0.42-0.80


OBSERVED = [("int4 g32", ("int", 4, 32)), ("int4 g32 asym", ("int", 4, 32, False)), ("int8 channel", ("int", 8, None)),
            ("fp8", ("fp8",)), ("nvfp4", ("nvfp4",)), ("mxfp4", ("mxfp4",)), ("gguf q4_0", ("gguf_q4_0",))]


@pytest.mark.parametrize("args", [a for _, a in OBSERVED], ids=[n for n, _ in OBSERVED])
def test_mse_observer_picks_the_least_error_range_of_each_block(args):
    """On heavy-tailed weights, the mse observer's params give every block the least squared error
    among the shrunk ranges it tries (never more than the range itself, minmax's choice), and less
    in total; a layer quantized with it holds those params fixed, through a stage round trip."""
    from compress.formats import CLIP_RATIOS, weight_format

    w = torch.distributions.StudentT(3.0).sample((48, 128)) * 0.02
    minmax, mse = weight_format(*args), weight_format(*args, observer="mse")
    st, wg = mse.tensor_state(w), mse.grouped(w)

    def block_error(p):
        return (mse.qdq_elem(wg, p, st) - wg).pow(2).sum(-1)

    chosen = block_error(mse.fit(wg, st))
    every = torch.stack([block_error(mse.params(wg * r, st)) for r in CLIP_RATIOS])
    assert torch.equal(chosen, every.min(0).values)
    assert torch.equal(block_error(minmax.fit(wg, st)), every[0])
    assert chosen.sum() < every[0].sum()  # (int4 g32 here: ~0.7x; int8 per channel: ~0.95x)
    assert torch.equal(mse.qdq(w), mse.qdq(w, mse.quant_params(w)))


def test_mse_observer_params_are_held_by_the_layer_and_used_by_gptq(tmp_path):
    from compress.formats import weight_format
    from compress.gptq import gptq

    model, ref = tiny(), tiny()
    quantize_linears(model, WeightQuant(bits=4, group_size=32, observer="mse"))
    quantize_linears(ref, WeightQuant(bits=4, group_size=32))
    q = model.model.layers[0].mlp.down_proj
    fmt = weight_format("int", 4, 32, observer="mse")
    held = fmt.quant_params(q.weight)
    assert q.opts["frozen"] and torch.equal(q.qparams()["scale"], held["scale"])
    with torch.no_grad():
        q.weight.mul_(1.5)  # held fixed: the grid does not follow the weight (minmax's does)
    assert torch.equal(q.quantized_weight(), fmt.qdq(q.weight, held))
    assert not torch.equal(q.quantized_weight(), fmt.qdq(q.weight))
    with torch.no_grad():
        q.weight.div_(1.5)
    error = {name: sum((m.quantized_weight() - m.weight).pow(2).sum() for m in net.modules()
                       if isinstance(m, QuantLinear)) for name, net in (("mse", model), ("minmax", ref))}
    assert error["mse"] < error["minmax"]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_same_after_stage_and_export(model, ids, tmp_path)
    # GPTQ fits each group with the observer: with uncorrelated unit inputs it compensates nothing, so
    # its result is the observer's round to nearest
    w = torch.distributions.StudentT(3.0).sample((16, 128)) * 0.02
    assert torch.equal(gptq(w, torch.eye(128), fmt).quantized, fmt.qdq(w))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_the_mse_observer_searches_each_block_once(monkeypatch, act_order):
    """GPTQ fits each group as it comes up (or, with act_order, all of them first): every block is
    searched once, never a second whole-weight search for params it does not use."""
    from compress.formats import WeightFormat, weight_format
    from compress.gptq import gptq

    searched, least_error = [], WeightFormat._least_error

    def spy(self, wg, st):
        searched.append(wg.shape[0] * wg.shape[1])  # blocks searched by this call
        return least_error(self, wg, st)

    monkeypatch.setattr(WeightFormat, "_least_error", spy)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    gptq(w, 2 * x.t() @ x / len(x), weight_format("int", 4, 32, observer="mse"), act_order=act_order)
    assert sum(searched) == 24 * 128 // 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: GPTQ on a model that lives there")
def test_gptq_of_a_cuda_weight_equals_the_cpu_one():
    from compress.formats import weight_format
    from compress.gptq import gptq

    torch.manual_seed(0)
    x = torch.randn(2048, 128) * torch.linspace(0.2, 3, 128)
    w, H = torch.randn(64, 128) * 0.05, 2 * x.t() @ x / len(x)
    fmt = weight_format("int", 4, 64)
    cpu, gpu = gptq(w, H, fmt), gptq(w.cuda(), H.cuda(), fmt)
    assert gpu.quantized.is_cuda
    # the same rounding decisions, but for values the devices' float error puts on the other side of a bin edge
    assert ((gpu.quantized.cpu() - cpu.quantized).abs() < 1e-5).float().mean() > 0.99
    assert abs(gpu.loss - cpu.loss) <= 0.01 * cpu.loss


def test_gptq_model_freezes_params_that_survive_the_stage_and_the_export(tmp_path):
    from compress.gptq import gptq_model

    model, ref = tiny(), tiny()
    swapped = quantize_linears(model, WeightQuant(bits=4, group_size=32))
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        rtn = (model(input_ids=ids).logits - want).pow(2).mean()
        gptq_model(model, blocks, swapped, batch_size=8, log=lambda *_: None)
        after = (model(input_ids=ids).logits - want).pow(2).mean()
    assert after < rtn
    q = model.model.layers[0].self_attn.q_proj
    assert q.opts["frozen"] and not torch.equal(q.quantized_weight(), q.weight)  # the latent weight, off the grid
    assert torch.equal(q.wformat.qdq(q.quantized_weight(), q.qparams()), q.quantized_weight())
    assert_same_after_stage_and_export(model, ids, tmp_path)


@pytest.mark.slow
def test_qat_from_gptq_trains_the_weights_on_gptqs_fixed_grid(tiny_teacher, tmp_path):
    """``qat`` with ``method: gptq`` starts where a ``quantize`` GPTQ stage ends (same calibration
    text, same params) and then moves the weights while GPTQ's scales stay as they were."""
    weights = {"bits": 4, "group_size": 32}
    gptq = {"method": "gptq", "gptq": {"calibration_blocks": 8}}
    runs = {}
    for kind, extra in (("quantize", {}), ("qat", {"max_steps": 3})):
        recipe = write_recipe(tmp_path / f"{kind}.yaml", tiny_teacher, tmp_path / kind, student={"init": "teacher"},
                              stages=[{"kind": kind, "weights": weights, **gptq, **extra}])
        p = launch(recipe)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[kind] = load_stage_model(tmp_path / kind / f"stages/0-{kind}/model")
        info = json.loads((tmp_path / kind / f"stages/0-{kind}/transform.json").read_text())
        assert info["gptq_tokens"] > 0
    ptq, qat = (dict(runs[k].named_modules()) for k in ("quantize", "qat"))
    moved = 0
    for name, m in qat.items():
        if isinstance(m, QuantLinear):
            assert m.opts["frozen"], name
            for key, value in ptq[name].qparams().items():
                torch.testing.assert_close(m.qparams()[key], value, rtol=0, atol=0)  # GPTQ's grid, held fixed
            moved += not torch.equal(m.quantized_weight(), ptq[name].quantized_weight())
    assert moved > 0  # training changed quantized weights on that grid


def _logit_gap(model, ref, ids):
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref(input_ids=ids).logits).pow(2).mean())


@pytest.mark.parametrize("start", ["rtn", "gptq", "lsq"])
def test_blockwise_reconstruction_brings_the_quantized_model_closer_to_the_original(start):
    """Each layer trained towards the original model's output at its depth: the logits move closer
    to the unquantized model's on text it did not see, from round to nearest and from GPTQ; GPTQ's
    fixed grid stays fixed (only the weights move on it), learned scales move."""
    from compress.blockwise import blockwise_model, snapshot_layers
    from compress.gptq import gptq_model

    model, ref = tiny(), tiny()
    originals = snapshot_layers(model)
    swapped = quantize_linears(model, WeightQuant(bits=4, group_size=32, learn_scales=start == "lsq"))
    # 128 blocks: on fewer the layers fit the calibration tokens and the held-out gap stops at a floor
    blocks = torch.randint(0, 300, (128, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    if start != "rtn":
        with torch.no_grad():
            gptq_model(model, blocks, swapped, batch_size=8, log=lambda *_: None)
    grid = {n: {k: v.clone() for k, v in m.qparams().items()} for n, m in swapped.items()}
    before = _logit_gap(model, ref, ids)
    # lr 3e-5: this model's weights (std 0.02) span a few grid steps, and 1e-4 overshoots GPTQ's start here
    errors = blockwise_model(model, blocks, originals, epochs=2, lr=3e-5, log=lambda *_: None)
    assert set(errors) == {0, 1} and sum(e[1] for e in errors.values()) < 0.85 * sum(e[0] for e in errors.values())
    assert _logit_gap(model, ref, ids) < 0.8 * before  # measured 0.63 / 0.69 / 0.58 of it (rtn / gptq / lsq)
    for name, m in swapped.items():
        if start == "gptq":  # GPTQ's params held fixed: the result still lies on its grid
            assert all(torch.equal(m.qparams()[k], v) for k, v in grid[name].items()), name
        if start == "lsq":
            assert not torch.equal(m.qparams()["scale"], grid[name]["scale"]), name
    for a, b in zip(originals, ref.model.layers):  # the snapshot is the original, untouched
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_blockwise_puts_back_a_layer_that_an_overshooting_lr_made_worse():
    from compress.blockwise import blockwise_model, snapshot_layers

    model = tiny()
    originals = snapshot_layers(model)
    quantize_linears(model, WeightQuant(bits=4, group_size=32))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    errors = blockwise_model(model, blocks, originals, epochs=1, lr=0.5, log=lambda *_: None)
    assert all(after == first for first, after in errors.values())
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_blockwise_trains_a_bf16_model_in_float32_and_keeps_a_sparsity_mask():
    from compress.blockwise import blockwise_model, snapshot_layers

    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.up_proj, layer.self_attn.q_proj):
                lin.register_buffer("mask", (torch.rand_like(lin.weight) > 0.5).float())
                lin.weight.mul_(lin.mask)
    model = model.to(torch.bfloat16)
    originals = snapshot_layers(model)
    swapped = quantize_linears(model, WeightQuant(bits=4, group_size=32))
    masked = [m for m in swapped.values() if m.opts["masked"]]
    assert len(masked) == 4
    start = {id(m): m.weight.detach().clone() for m in masked}
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    errors = blockwise_model(model, blocks, originals, epochs=4, lr=1e-4, log=lambda *_: None)
    assert all(after < first for first, after in errors.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for m in masked:
        assert torch.equal(m.weight[m.mask == 0], torch.zeros_like(m.weight[m.mask == 0]))
        assert not torch.equal(m.weight, start[id(m)])  # trained (an update below bf16's step would be lost)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_gives_learned_scales_its_own_grid_to_start_from(act_order):
    """learn_scales + method: gptq: the scales training starts from are GPTQ's, and the LSQ forward
    is then GPTQ's result, layer after layer (as with GPTQ's frozen params)."""
    from compress.gptq import gptq_model

    model, ref = tiny(), tiny()
    lsq = quantize_linears(model, WeightQuant(bits=4, group_size=32, learn_scales=True))
    frozen = quantize_linears(ref, WeightQuant(bits=4, group_size=32))
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 64)
    with torch.no_grad():
        for swapped, m in ((lsq, model), (frozen, ref)):
            gptq_model(m, blocks, swapped, batch_size=8, act_order=act_order, log=lambda *_: None)
        for name, q in lsq.items():
            assert not q.opts["frozen"] and q.scale.requires_grad, name
            torch.testing.assert_close(q.scale, frozen[name].qparams()["scale"], rtol=0, atol=0)
            if q.in_features == 64:
                torch.testing.assert_close(q(x), frozen[name](x), rtol=1e-6, atol=1e-6)


def test_kv_cache_quantization_rounds_k_and_v_survives_the_stage_and_is_exported(tmp_path):
    from compress.kv_quant import KVQuant, KVSpec, attach_kv_quant, calibrate_kv

    model = tiny()
    quantize_linears(model, WeightQuant(bits=8, group_size=None))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        quants = attach_kv_quant(model, KVSpec("int8", per_head=True))
        calibrate_kv(model, quants, torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(1)))
        after = model(input_ids=ids).logits
    q = model.model.layers[0].self_attn.kv_quant
    assert q.k_scale.shape == (2, 1, 1) and (q.k_scale > 0).all() and not torch.equal(q.k_scale, q.v_scale)
    assert 0 < (after - before).abs().max() < 0.1  # the K/V rounding changed the logits, a little
    save_stage_model(model, tmp_path / "m")
    back = load_stage_model(tmp_path / "m")  # the hook is re-installed on load
    assert isinstance(back.model.layers[1].self_attn.kv_quant, KVQuant)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, after, rtol=0, atol=0)
    out, _ = export_and_reload(model, tmp_path)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["kv_cache_scheme"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
                                          "strategy": "attn_head"}
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    assert torch.equal(state["model.layers.0.self_attn.k_scale"], q.k_scale)
    assert not any("kv_quant" in k for k in state)


@pytest.mark.slow
def test_qat_with_learned_scales_and_a_quantized_kv_cache_exports_both(tiny_teacher, tmp_path):
    """LSQ scales train (they leave the weights' own RTN scales), ride through the run (DeepSpeed
    parameters) and export; the KV scales are calibrated, held, and exported beside them."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          train={"lr": 1e-2},
                          stages=[{"kind": "qat", "weights": {"bits": 4, "group_size": 32, "learn_scales": True},
                                   "max_steps": 3,
                                   "kv_cache": {"format": "fp8", "per_head": True, "calibration_blocks": 4}}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    info = json.loads((out / "stages/0-qat/transform.json").read_text())
    assert info["kv_cache"] == "fp8" and info["kv_bytes_per_token"] * 2 == info["kv_bytes_per_token_bf16"]
    ours = load_stage_model(out / "stages/0-qat/model")
    scale = ours.model.layers[0].self_attn.kv_quant.k_scale
    assert scale.shape[0] == ours.config.num_key_value_heads and (scale > 0).all()
    qconfig = json.loads((out / "final/config.json").read_text())["quantization_config"]
    assert qconfig["kv_cache_scheme"]["strategy"] == "attn_head" and qconfig["format"] == "pack-quantized"
    state = load_file(out / "final/model.safetensors")
    assert torch.equal(state["model.layers.0.self_attn.k_scale"].float(), scale.float())
    up = ours.model.layers[0].mlp.up_proj
    rtn = up.wformat.quant_params(up.weight)["scale"]
    assert not torch.equal(up.qparams()["scale"], rtn)  # trained away from the weights' own scales
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight_scale"].float(), up.qparams()["scale"])


@pytest.mark.slow
def test_sigkill_mid_qat_then_resume_ends_where_an_unbroken_run_ends(tiny_teacher, tmp_path):
    """Learned scales (optimizer state), GPTQ's frozen params and calibrated KV scales (buffers)
    all come back from the checkpoint: the resumed run's result equals the unbroken run's."""
    from safetensors.torch import load_file

    from tests.tiny import kill_at_checkpoint, launch_cmd

    kv = {"format": "fp8", "per_head": True, "calibration_blocks": 4}
    stages = [{"kind": "quantize", "method": "gptq", "gptq": {"calibration_blocks": 4},
               "weights": {"bits": 4, "group_size": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
              {"kind": "qat", "weights": {"bits": 4, "group_size": 32, "learn_scales": True,
                                          "targets": ["gate_proj", "up_proj", "down_proj"]}, "kv_cache": kv}]
    runs = {}
    for name in ("unbroken", "killed"):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_teacher, tmp_path / name, student={"init": "teacher"},
                              train={"lr": 1e-2, "max_steps": 10, "save_every": 2}, stages=stages)
        if name == "killed":
            killed_at = kill_at_checkpoint(launch_cmd(recipe), tmp_path / name / "stages/1-qat/checkpoints", 4)
            assert killed_at and killed_at < 10
        p = launch(recipe)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "stages/1-qat/model/model.safetensors")
    assert f"resumed stage 1 (qat) from step {killed_at}" in p.stdout
    a, b = runs["unbroken"], runs["killed"]
    assert a.keys() == b.keys() and any(k.endswith("k_scale") for k in a) and any(".qp_" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_bf16_casts_keep_the_rotary_frequencies_in_fp32():
    """What from_pretrained(dtype=bf16) does, and so what users of the export get."""
    from compress.modelio import rebuild
    from compress.teacher import Teacher

    model = tiny()
    want = model.model.rotary_emb.inv_freq.clone()
    teacher = Teacher(model, dtype=torch.bfloat16)
    assert teacher.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert teacher.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(teacher.model.model.rotary_emb.inv_freq, want)
    again = rebuild(teacher.model, teacher.model.state_dict())
    assert again.model.norm.weight.dtype == torch.bfloat16 and again.model.rotary_emb.inv_freq.dtype == torch.float32


def test_learned_scales_train_match_their_export_and_survive_the_stage(tmp_path):
    """LSQ: the scale gets a gradient, an optimizer step moves it, and the export (scales rounded
    up to bf16 values, as the forward uses them) reloads with the same logits."""
    model = tiny()
    quantize_linears(model, WeightQuant(bits=4, group_size=32, learn_scales=True))
    q = model.model.layers[0].mlp.up_proj
    start = q.scale.detach().clone()
    torch.testing.assert_close(q.quantized_weight(), dequantize(*quantize(q.weight, IntSpec(4, 32)), IntSpec(4, 32)))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(q.scale.detach(), start)
    with torch.no_grad():
        torch.testing.assert_close(forward_weight(q), q.quantized_weight(), rtol=0, atol=0)
    assert_same_after_stage_and_export(model, ids, tmp_path)


def forward_weight(layer):
    """The weight a QuantLinear's forward multiplies by (read through an identity input)."""
    return layer(torch.eye(layer.in_features)).t()

"""QAT and PTQ stages on tiny models: fake-quant linears, stage results that round-trip, and an
export that plain transformers (with compressed-tensors) loads back to the same logits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.methods.qat import QuantLinear, WeightQuant, quantize_linears
from compress.modelio import load_stage_model, save_stage_model
from compress.quant import IntSpec, dequantize, quantize
from tests.tiny import REPO, run_env, write_recipe


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


def launch(recipe, *extra):
    return subprocess.run([sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe), *extra],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [
    {"kind": "qat", "weights": {"bits": 4, "group_size": 32}, "max_steps": 4},
    {"kind": "quantize", "weights": {"bits": 8, "group_size": None}},
], ids=["qat-int4-g32", "ptq-int8-channel"])
def test_quantized_run_exports_compressed_tensors_with_the_same_logits(tiny_teacher, tmp_path, stage):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[stage])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    config = json.loads((out / "final/config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == stage["weights"]["bits"]
    ours = load_stage_model(out / f"stages/0-{stage['kind']}/model")  # the fake-quant model the run ended with
    exported = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["final"]["kl"] > 0  # quantization changed the model ...
    teacher_bytes = summary["table"][0]["bytes_on_disk"]
    assert summary["table"][-1]["bytes_on_disk"] < teacher_bytes  # ... and made it smaller


@pytest.mark.parametrize("weights,message", [
    ({"bits": 4, "group_size": 128}, "group_size 128 does not divide q_proj's 64 input features"),
    ({"bits": 4, "targets": ["qkv_proj"]}, "match no linear"),
    ({"bits": 4, "symmetric": False}, "asymmetric weights cannot be exported as compressed-tensors"),
    ({"bits": 3}, "bits"),
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
def test_qat_for_gguf_exports_a_gguf_with_the_trained_weights(gguf_teacher, tmp_path):
    from compress.models import load_tokenizer

    recipe = write_recipe(tmp_path / "r.yaml", gguf_teacher, tmp_path / "out", teacher={"source": str(gguf_teacher)},
                          student={"init": "teacher"},
                          stages=[{"kind": "qat", "weights": {"format": "gguf_q4_0"}, "max_steps": 3}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "final/model-q4_0.gguf").is_file()
    ours = load_stage_model(out / "stages/0-qat/model")
    assert ours.model.layers[0].mlp.up_proj.fmt == "gguf_q4_0"
    back = AutoModelForCausalLM.from_pretrained(out / "final", gguf_file="model-q4_0.gguf", dtype=torch.float32)
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

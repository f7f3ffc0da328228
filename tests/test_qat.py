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

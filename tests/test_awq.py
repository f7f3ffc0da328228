"""AWQ's scales (compress.awq): folded without changing the float model, searched so that round to
nearest loses less, limited to the targeted linears, and refused on layers it cannot fold into."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.awq import awq_model
from compress.formats import weight_format
from compress.methods.qat import PROJECTIONS

FMT = weight_format("int", 4, 32, True, True, "minmax")


def outlier_model():
    """A tiny GQA Llama (4 heads, 2 KV heads) whose four groups' inputs each have a few large
    channels, as trained LLMs do: where AWQ's scales pay."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for op in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.v_proj, layer.mlp.up_proj):
                op.weight[:4] *= 10
    return model


def formats(model, suffixes=PROJECTIONS):
    return {n: FMT for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in suffixes}


def rtn(model, names):
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in names:
                m.weight.copy_(FMT.qdq(m.weight))
    return model


BLOCKS = torch.randint(0, 300, (32, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scales", ["activation", "duo"])
def test_awq_scales_change_the_weights_not_the_float_model(scales):
    """Every group gets a scale (alpha > 0) and the folded model gives the same logits: the norms, v's
    rows (one scale per KV channel, shared by the two query heads reading it) and up's rows absorb it."""
    model, ref = outlier_model(), outlier_model()
    stats = awq_model(model, BLOCKS, formats(model), scales=scales, log=lambda *_: None)
    assert len(stats) == 8 and all(s.alpha > 0 and s.duo == (scales == "duo") for s in stats.values()), stats
    assert all(s.error < s.base for s in stats.values())  # the searched error falls below the unscaled one
    layer, orig = model.model.layers[0], ref.model.layers[0]
    for path in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "input_layernorm"):
        assert not torch.equal(layer.get_submodule(path).weight, orig.get_submodule(path).weight), path
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_awq_then_round_to_nearest_is_closer_to_the_float_model_than_round_to_nearest():
    model, ref = outlier_model(), outlier_model()
    names = formats(model)
    awq_model(model, BLOCKS, names, log=lambda *_: None)
    plain = rtn(copy.deepcopy(ref), names)
    rtn(model, names)
    with torch.no_grad():
        target = ref(IDS).logits
        gap = (model(IDS).logits - target).pow(2).mean() / (plain(IDS).logits - target).pow(2).mean()
    assert gap < 0.7, gap  # measured 0.43 on held-out tokens


def test_awq_both_takes_the_better_scale_of_each_group():
    errors = {}
    for scales in ("activation", "duo", "both"):
        model = outlier_model()
        errors[scales] = awq_model(model, BLOCKS, formats(model), scales=scales, log=lambda *_: None)
    for name, both in errors["both"].items():
        assert both.error == pytest.approx(min(errors["activation"][name].error, errors["duo"][name].error), rel=1e-6)
    assert len({s.duo for s in errors["both"].values()}) == 2  # each kind wins somewhere here


def test_awq_scales_only_the_targeted_linears():
    """With only down_proj quantized, only the up -> down pair is rescaled; attention and the norms stay."""
    model, ref = outlier_model(), outlier_model()
    stats = awq_model(model, BLOCKS, formats(model, ("down_proj",)), log=lambda *_: None)
    assert sorted(stats) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    changed = {n for (n, p), q in zip(model.named_parameters(), ref.parameters()) if not torch.equal(p, q)}
    assert changed == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("up", "down")}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_awq_after_an_upcycle_stage_fails_before_anything_is_written(tiny_teacher, tmp_path):
    from tests.tiny import launch, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "upcycle", "experts": 2, "top_k": 1},
                                  {"kind": "quantize", "awq": {}, "weights": {"bits": 4, "group_size": 32}}])
    p = launch(recipe)
    assert p.returncode == 2 and "awq folds its scales into llama" in p.stderr and "Traceback" not in p.stderr, \
        p.stderr[-2000:]
    assert not (tmp_path / "out").exists()

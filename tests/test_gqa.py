"""GQA conversion: merges that are exact on identical heads and optimal for what they claim, and a
real run (gqa -> distill) whose export is a stock HF model with fewer KV heads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.kv_heads import merge_k_weighted, merge_mean, merge_state, merge_v_weighted
from compress.methods.gqa import query_energy
from tests.tiny import launch, write_recipe


def tiny(kv=4):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=True)).eval()


def converted(model, kv_new, method, energy=None):
    from compress.pruning import pruned_config

    cfg = pruned_config(model.config, {"num_key_value_heads": kv_new})
    small = LlamaForCausalLM(cfg).eval()
    state = merge_state(model.state_dict(), model.config, kv_new, method, energy)
    small.load_state_dict(state, strict=False)
    return small


@pytest.mark.parametrize("method", ["mean", "weighted"])
def test_identical_heads_in_a_group_convert_exactly(method):
    model = tiny(kv=4)
    with torch.no_grad():
        for layer in model.model.layers:  # heads (0, 1) and (2, 3) identical: a 4 -> 2 merge loses nothing
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(4, 16, 64)
                w[1], w[3] = w[0], w[2]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    energy = query_energy(model, ids) if method == "weighted" else None
    small = converted(model, 2, method, energy)
    assert small.config.num_key_value_heads == 2 and small.model.layers[0].self_attn.k_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_weighted_merges_minimise_what_they_claim():
    torch.manual_seed(0)
    kv_old, d, hidden, heads = 4, 8, 16, 8
    wk, wv = torch.randn(kv_old * d, hidden), torch.randn(kv_old * d, hidden)
    energy = torch.rand(kv_old, d // 2) * 10
    wo = torch.randn(hidden, heads * d)

    def k_loss(m):  # sum_h sum_p c_h[p] ||k_h[p rows] - k'[p rows]||^2 per merged group
        c = torch.cat([energy, energy], 1)
        h = wk.reshape(kv_old, d, hidden)
        mm = m.reshape(2, d, hidden).repeat_interleave(2, 0)
        return float((c[..., None] * (h - mm) ** 2).sum())

    def v_loss(m):  # sum over query heads i of ||W_o,i (v_h(i) - v')||^2
        h = wv.reshape(kv_old, d, hidden)
        mm = m.reshape(2, d, hidden).repeat_interleave(2, 0)
        o = wo.reshape(hidden, heads, d).permute(1, 0, 2)
        diff = (h - mm).repeat_interleave(heads // kv_old, 0)
        return float(torch.einsum("ihd,idx->ihx", o, diff).pow(2).sum())

    mean_k, mean_v = merge_mean(wk, kv_old, 2), merge_mean(wv, kv_old, 2)
    best_k, best_v = merge_k_weighted(wk, energy, kv_old, 2), merge_v_weighted(wv, wo, heads, kv_old, 2)
    assert k_loss(best_k) < k_loss(mean_k) and v_loss(best_v) < v_loss(mean_v)
    for eps in (1e-2, -1e-2):  # a stationary point: nudging it makes it worse
        assert k_loss(best_k) <= k_loss(best_k + eps) and v_loss(best_v) <= v_loss(best_v + eps)



@pytest.mark.slow
def test_gqa_then_distill_exports_a_stock_model_with_fewer_kv_heads(tiny_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "gqa", "num_key_value_heads": 1, "calibration_blocks": 4},
                                  {"kind": "distill", "max_steps": 3}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    info = json.loads((out / "stages/0-gqa/transform.json").read_text())
    assert info["kv_heads"] == [2, 1] and info["kv_bytes_per_token_bf16"][0] == 2 * info["kv_bytes_per_token_bf16"][1]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_key_value_heads == 1 and final.model.layers[0].self_attn.v_proj.out_features == 16
    assert "modules.json" not in {f.name for f in (out / "final").iterdir()}
    # generate() reads generation_config: built by from_config during training, it said use_cache False,
    # and the export decoded every token over the whole context (16x slower at 1,024 tokens)
    assert final.generation_config.use_cache is True
    summary = json.loads((out / "summary.json").read_text())
    after = next(r for r in summary["table"] if r["model"].startswith("after 0-gqa"))
    assert summary["metrics"]["final"]["kl"] < after["kl"]  # uptraining recovered some of the merge's loss


@pytest.mark.parametrize("stages,message", [
    ([{"kind": "gqa", "num_key_value_heads": 3}], "num_key_value_heads 3 must divide the model's 2 KV heads"),
    ([{"kind": "gqa", "num_key_value_heads": 2}], "is what the model has already"),
    ([{"kind": "quantize"}, {"kind": "gqa", "num_key_value_heads": 1}], "a gqa stage after a quantize stage"),
])
def test_bad_gqa_input_fails_in_one_line_before_any_weights_load(tiny_teacher, tmp_path, stages, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=stages)
    p = launch(recipe, "--dry-run")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

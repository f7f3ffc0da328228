"""Dense -> MoE upcycling: exact at init, router losses in the loop, and a real run whose export is
a stock Mixtral that transformers loads alone."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.upcycle import moe_config, moe_layers, param_counts, router_losses, upcycled_state, utilization
from tests.tiny import launch, write_recipe


def tiny(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def upcycled(dense, experts, top_k, init, layers=None, shared_expert=False, **kw):
    cfg = moe_config(dense.config, experts, top_k, init, 0.01, 0.001, layers, shared_expert)
    moe = AutoModelForCausalLM.from_config(cfg).eval()
    state = upcycled_state(dense.state_dict(), dense.config, experts, init, layers=moe_layers(cfg),
                           shared_expert=None if cfg.model_type == "mixtral" else shared_expert, **kw)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return moe


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


@pytest.mark.parametrize("experts,top_k,init", [(4, 2, "copy"), (4, 1, "copy"), (4, 4, "split"), (2, 2, "split")])
def test_upcycled_model_equals_the_dense_one_at_init(experts, top_k, init):
    dense = tiny()
    moe = upcycled(dense, experts, top_k, init)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = moe(input_ids=ids)
        torch.testing.assert_close(out.logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_logits) == 2 and out.aux_loss is not None
    assert type(moe).__name__ == "MixtralForCausalLM"
    counts = param_counts(moe.config)
    assert counts["total"] == non_embedding_params(moe)
    assert counts["total"] > counts["active"] or top_k == experts


@pytest.mark.parametrize("layers,shared,init,top_k", [([1], False, "copy", 2), ([0, 2], True, "copy", 1),
                                                      (None, True, "split", 4), ([2], True, "copy", 4)])
def test_chosen_layers_or_a_shared_expert_give_a_stock_qwen2_moe_equal_to_the_dense_model(tmp_path, layers, shared,
                                                                                          init, top_k):
    """Upcycling some layers (the rest keep their MLP) or adding a shared expert: a stock
    Qwen2MoeForCausalLM, exact at init, whose parameter count is what param_counts says, and which
    round-trips through save_pretrained / AutoModelForCausalLM (a width-0 shared expert included)."""
    dense = tiny(layers=3)
    moe = upcycled(dense, 4, top_k, init, layers=layers, shared_expert=shared, noise=0.0)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    sparse = moe_layers(moe.config)
    assert sparse == (layers or [0, 1, 2])
    assert [type(l.mlp).__name__ for l in moe.model.layers] == [
        "Qwen2MoeSparseMoeBlock" if i in sparse else "Qwen2MoeMLP" for i in range(3)]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = moe(input_ids=ids)
        torch.testing.assert_close(out.logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_logits) == len(sparse) and len(utilization(moe, ids)) == len(sparse)
    counts = param_counts(moe.config)
    assert counts["total"] == non_embedding_params(moe) and counts["active"] <= counts["total"]
    moe.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, out.logits)


def test_noise_breaks_the_symmetry_and_split_with_fewer_active_experts_differs():
    dense = tiny()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        noisy = upcycled(dense, 4, 2, "copy", noise=0.01)(input_ids=ids).logits
        partial = upcycled(dense, 4, 2, "split")(input_ids=ids).logits
    assert 0 < (noisy - want).abs().max() < 0.5
    assert (partial - want).abs().max() > 1e-3


def test_router_losses_are_the_load_balance_and_z_terms():
    moe = upcycled(tiny(), 4, 2, "copy", router_std=1.0)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    out = moe(input_ids=ids)
    extra, logs = router_losses(out, moe.config)
    z = torch.stack([torch.logsumexp(x.float(), -1).pow(2).mean() for x in out.router_logits]).mean()
    torch.testing.assert_close(extra, 0.01 * out.aux_loss + 0.001 * z)
    assert set(logs) == {"load_balance", "router_z"}
    extra.backward()
    assert moe.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the router learns from them
    assert router_losses(tiny()(input_ids=ids), tiny().config) == (None, {})  # a dense model has none
    util = utilization(moe, ids)
    assert len(util) == 2 and all(abs(sum(row) - 1) < 1e-6 for row in util)



def test_capacity_keeps_each_experts_highest_weighted_routings_up_to_its_capacity():
    from compress.upcycle import capacity_keep

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 2, generator=g)
    indices = torch.randint(0, 4, (50, 2), generator=g)
    indices[:, 1] = (indices[:, 0] + 1) % 4  # two different experts a token
    for factor in (0.5, 1.0):
        keep = capacity_keep(indices, scores, 4, factor)
        cap = math.ceil(factor * 50 * 2 / 4)
        for e in range(4):
            mine = indices == e
            assert keep[mine].sum() == min(cap, int(mine.sum()))  # full up to capacity ...
            if (~keep & mine).any():  # ... with its best: every dropped one weighs no more than every kept one
                assert scores[~keep & mine].max() <= scores[keep & mine].min()
    assert capacity_keep(indices, scores, 4, 2.0).all()  # 2 x the even share fits everything here


def test_capacity_router_drops_while_training_and_is_a_stock_router_otherwise(tmp_path):
    from compress.modelio import load_stage_model, materialize, save_stage_model
    from compress.upcycle import CapacityRouter, dropped_fraction, with_capacity

    moe = upcycled(tiny(), 4, 2, "copy", router_std=1.0, noise=0.05)
    ref = copy.deepcopy(moe)
    with_capacity(moe, 0.5)
    assert isinstance(moe.model.layers[0].mlp.gate, CapacityRouter)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, ref(input_ids=ids).logits)  # eval: dropless
        assert dropped_fraction(moe) is None
        moe.train()
        dropped = moe(input_ids=ids).logits
        assert 0 < dropped_fraction(moe) < 1 and not torch.allclose(dropped, ref(input_ids=ids).logits)
        out = moe(input_ids=ids, output_router_logits=True)
        assert len(out.router_logits) == 2 and out.aux_loss is not None  # the router losses still see it
    moe.eval()
    save_stage_model(moe, tmp_path / "m")
    back = load_stage_model(tmp_path / "m")  # between stages and after a resume it stays capacity-limited
    assert back.model.layers[1].mlp.gate.capacity_factor == 0.5
    plain = materialize(copy.deepcopy(back))  # the export: stock routers, the same weights
    assert type(plain.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.slow
def test_upcycle_then_distill_exports_a_mixtral_that_transformers_loads_alone(tiny_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "upcycle", "experts": 4, "top_k": 2, "noise": 0.01, "calibration_blocks": 4,
                                   "capacity_factor": 1.0},
                                  {"kind": "distill", "max_steps": 4}], train={"eval_every": 2})
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(final).__name__ == "MixtralForCausalLM" and final.config.num_local_experts == 4
    from benchmarks.upcycle import _plot, curve  # the benchmark's loss curves, read from this real run

    table = json.loads((out / "summary.json").read_text())["table"]
    c = curve(out / "metrics.jsonl", table)
    assert c["eval_step"] == [0, 2, 4] and c["train_step"] and max(c["train_step"]) == 4
    assert c["eval_ppl"][0] == next(r for r in table if r["model"].startswith("after 0-upcycle"))["student_ppl"]
    assert c["eval_ppl"][-1] == table[-1]["student_ppl"] and all(x > 0 for x in c["eval_ppl"] + c["train_loss"])
    _plot({"moe": {0: c, 1: c}}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "modules.json" not in {f.name for f in (out / "final").iterdir()}
    from safetensors.torch import load_file

    keys = load_file(out / "final/model.safetensors")  # Mixtral's own checkpoint names, as vLLM reads them
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys and "model.layers.0.block_sparse_moe.gate.weight" in keys
    info = json.loads((out / "stages/0-upcycle/transform.json").read_text())
    assert info["moe_params"]["total"] > info["moe_params"]["active"]
    after = next(r for r in json.loads((out / "summary.json").read_text())["table"] if r["model"].startswith("after 0"))
    assert after["kl"] < 1e-3  # the upcycled model starts (nearly: the noise) where the dense one was
    util = json.loads((out / "final/expert_utilization.json").read_text())
    assert len(util["utilization"]) == 4 and len(util["utilization_at_init"]) == 4
    report = (out / "report.md").read_text()  # the report shows the histograms and the balance
    assert "## Experts (upcycled MoE)" in report and "![expert_utilization](figures/expert_utilization.png)" in report
    assert (out / "figures/expert_utilization.png").stat().st_size > 1000
    assert f"{util['params']['total']:,} total" in report
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("load_balance" in r and "router_z" in r for r in metrics), "the router losses were not trained"
    assert any(r.get("expert_dropped", 0) > 0 for r in metrics)  # capacity 1.0 drops some routings while training
    assert type(final.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"  # the export is dropless, stock
    router0 = final.model.layers[0].mlp.gate.weight
    again = launch(recipe)  # a finished run: the transform is not redone, the router state stays
    assert again.returncode == 0 and "already finished" in again.stdout
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out / "final").model.layers[0].mlp.gate.weight, router0)


def test_upcycling_chosen_layers_with_a_shared_expert_exports_a_qwen2_moe(tiny_teacher, tmp_path):
    """A real run: layers 1 and 2 of 4 upcycled with a shared expert and a capacity cap, trained
    with KD; the export is a stock Qwen2-MoE (dense layers 0 and 3, stock routers) that transformers
    loads alone, and the utilization covers the two MoE layers."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "upcycle", "experts": 4, "top_k": 2, "noise": 0.01, "calibration_blocks": 4,
                                   "layers": [1, 2], "shared_expert": True, "capacity_factor": 1.0},
                                  {"kind": "distill", "max_steps": 3}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(final).__name__ == "Qwen2MoeForCausalLM" and final.config.mlp_only_layers == [0, 3]
    assert [type(l.mlp).__name__ for l in final.model.layers] == ["Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock",
                                                                 "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP"]
    assert type(final.model.layers[1].mlp.gate).__name__ == "Qwen2MoeTopKRouter"  # the capacity router exported stock
    assert final.model.layers[1].mlp.shared_expert.down_proj.weight.shape == (64, 128)
    after = next(r for r in json.loads((out / "summary.json").read_text())["table"] if r["model"].startswith("after 0"))
    assert after["kl"] < 1e-3  # starts (nearly: the noise) where the dense model was
    util = json.loads((out / "final/expert_utilization.json").read_text())
    assert util["moe_layers"] == [1, 2] and len(util["utilization"]) == len(util["utilization_at_init"]) == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("expert_dropped", 0) > 0 for r in metrics) and any("load_balance" in r for r in metrics)
    assert "moe/layer2_expert3" in {k for r in metrics for k in r}


def test_expert_section_reports_each_phase_balance_against_the_even_share(tmp_path):
    from compress.report import expert_section, plot_expert_utilization

    payload = {"params": {"total": 400, "active": 100},
               "utilization_at_init": [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
               "utilization": [[0.55, 0.25, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]}
    text = "\n".join(expert_section(payload))
    assert "400 total, 100 active per token (25%)" in text
    init, after = [line for line in text.splitlines() if line.startswith("| at init") or line.startswith("| after")]
    assert [c.strip() for c in init.split("|")[2:5]] == ["1", "1", "0"]
    assert [c.strip() for c in after.split("|")[2:5]] == ["2.2", "0.4", "1"]  # 0.55/0.25, 0.1/0.25, one layer < 1/8
    assert plot_expert_utilization(payload, tmp_path / "u.png") and (tmp_path / "u.png").stat().st_size > 1000
    assert expert_section({"utilization": []}) == [] and not plot_expert_utilization(None, tmp_path / "v.png")


@pytest.mark.parametrize("stage,message", [
    ({"kind": "upcycle", "experts": 2, "top_k": 3}, "top_k 3 is more than the 2 experts"),
    ({"kind": "upcycle", "experts": 0}, "experts"),
    ({"kind": "upcycle", "experts": 3, "init": "split"}, "does not divide them"),
    ({"kind": "upcycle", "layers": [1, 7]}, "upcycle.layers has [7] but the model has 4 layers"),
    ({"kind": "upcycle", "layers": [1, 1]}, "lists a layer twice"),
])
def test_bad_upcycle_input_fails_in_one_line_before_any_weights_load(tiny_teacher, tmp_path, stage, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[stage])
    p = launch(recipe, "--dry-run")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

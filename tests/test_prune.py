"""Structured pruning: the math on tiny models (shapes, exactness where importance is zero, GQA
grouping, budgets, tied embeddings) and the stage in a real run (prune -> distill -> export ->
plain transformers load, resume without pruning twice, importance cache, bad input)."""

import json
import math
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compress.errors import CompressError
from compress.importance import activation_stats, random_stats
from compress.pruning import (apply_plan, candidate_shapes, check_shape, make_plan, non_embedding_params,
                              select_heads, shape_of)
from tests import tiny
from tests.tiny import REPO, run_env, write_recipe


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-12, initializer_range=0.2)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def blocks(n=6, t=24, vocab=300, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def dead_structures(model):
    """Zero the weights that make some structures contribute nothing; returns the shape without them.

    KV group 1 (v rows: its query heads output 0), MLP channels 0-31 (up rows), hidden channels 0-15
    (embedding columns and every write into the residual stream), and layer 2 (an identity block).
    """
    hd = model.config.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :16] = 0
        for l, layer in enumerate(model.model.layers):
            layer.self_attn.v_proj.weight[hd:2 * hd] = 0
            layer.mlp.up_proj.weight[:32] = 0
            layer.self_attn.o_proj.weight[:16] = 0
            layer.mlp.down_proj.weight[:16] = 0
            if l == 2:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2,
            "num_key_value_heads": 1}


@pytest.mark.parametrize("layer_score", ["kl", "cosine"])
def test_removing_zero_importance_structures_keeps_outputs(layer_score):
    model = llama()
    shape = dead_structures(model)
    x = blocks()
    stats = activation_stats(model, x, batch_size=4)
    plan = make_plan(model.config, shape, stats, layer_score)
    assert plan.layers == [0, 1, 3] and plan.hidden == list(range(16, 64))
    assert all(kv == [0] for kv in plan.kv_heads) and all(ch == list(range(32, 128)) for ch in plan.mlp)
    small = apply_plan(model, plan)
    with torch.no_grad():
        ref, out = model(input_ids=x).logits, small(input_ids=x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the negative control: cutting live structures instead changes the outputs
    other = make_plan(model.config, shape, {**stats, "hidden": -stats["hidden"]}, layer_score)
    with torch.no_grad():
        assert (apply_plan(model, other)(input_ids=x).logits - ref).abs().max() > 1e-2


def test_every_tensor_has_the_pruned_shape_and_embeddings_stay_tied():
    model = llama()
    shape = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2,
             "num_key_value_heads": 2}
    small = apply_plan(model, make_plan(model.config, shape, activation_stats(model, blocks(), 4, layer_blocks=0), "cosine"))
    assert shape_of(small.config) == shape and small.config.head_dim == 16
    expect = {"self_attn.q_proj.weight": (32, 32), "self_attn.k_proj.weight": (32, 32), "self_attn.v_proj.weight": (32, 32),
              "self_attn.o_proj.weight": (32, 32), "mlp.gate_proj.weight": (40, 32), "mlp.up_proj.weight": (40, 32),
              "mlp.down_proj.weight": (32, 40), "input_layernorm.weight": (32,), "post_attention_layernorm.weight": (32,)}
    state = small.state_dict()
    for l in range(2):
        for name, s in expect.items():
            assert tuple(state[f"model.layers.{l}.{name}"].shape) == s, name
    assert tuple(state["model.embed_tokens.weight"].shape) == (300, 32) and tuple(state["model.norm.weight"].shape) == (32,)
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    assert small(input_ids=blocks()).logits.shape == (6, 24, 300)


def test_gqa_groups_stay_whole():
    scores = torch.tensor([0.1, 0.2, 0.3, 9.0, 8.0, 7.0, 1.0, 5.0, 0.5])  # 3 KV groups of 3 query heads
    kv, q = select_heads(scores, n_kv=3, heads=4, kv=2)
    assert kv == [1, 2] and q == [3, 4, 6, 7]  # best groups, then the 2 best query heads inside each
    # in the pruned model query head i uses KV head i // (4 // 2): heads of one old group stay together
    assert [qi // 3 for qi in q] == [kv[i // 2] for i in range(4)]


def test_qwen2_biases_are_pruned_with_their_rows():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    shape = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    small = apply_plan(model, make_plan(model.config, shape, random_stats(model.config, 0), "cosine"))
    assert small.model.layers[0].self_attn.q_proj.bias.shape == (32,) and small.lm_head.weight.shape == (300, 48)
    assert non_embedding_params(small.config) == sum(
        p.numel() for n, p in small.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_budget_candidates_land_within_two_percent(fraction):
    cfg = llama(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4).config
    cands = candidate_shapes(cfg, fraction, hidden_multiple=32, mlp_multiple=16)
    assert len(cands) >= 3
    for shape in cands:
        assert abs(non_embedding_params(cfg, shape) / (fraction * non_embedding_params(cfg)) - 1) <= 0.02
        check_shape(cfg, shape)
    real = apply_plan(llama(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4), make_plan(cfg, cands[0], random_stats(cfg, 0), "cosine"))
    counted = sum(p.numel() for n, p in real.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert counted == non_embedding_params(cfg, cands[0])


@pytest.mark.parametrize("target,message", [
    ({"num_attention_heads": 8}, "more than the model has"),
    ({"num_hidden_layers": 5}, "more than the model has"),
    ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "keep more KV heads"),
    ({"intermediate_size": 0}, "keep at least 1"),
    ({"hidden_size": 50}, "not a multiple of num_attention_heads"),
])
def test_impossible_shapes_are_refused(target, message):
    cfg = llama().config
    with pytest.raises(CompressError, match=message):
        check_shape(cfg, {**shape_of(cfg), **target})


# ---------------------------------------------------------------- the stage in a real run

def launch(recipe, *extra):
    return tiny.launch(recipe, *extra, timeout=900)


PRUNE = {"kind": "prune", "num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "calibration_blocks": 8}


@pytest.fixture(scope="module")
def pruned_run(tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    recipe = write_recipe(tmp / "r.yaml", tiny_teacher, tmp / "out", student={"init": "teacher"},
                          train={"max_steps": 4, "save_every": 2},
                          stages=[{**PRUNE, "cache_dir": str(tmp / "imp")}, {"kind": "distill", "hidden_weight": 0.5}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return recipe, tmp / "out", p


@pytest.mark.slow
def test_prune_then_distill_exports_a_plain_smaller_model(pruned_run, tiny_teacher):
    _, out, p = pruned_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert shape_of(model.config) == {k: PRUNE[k] for k in shape_of(model.config)}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    info = json.loads((out / "stages/0-prune/transform.json").read_text())
    assert info["shape"]["hidden_size"] == 48 and len(info["layers_kept"]) == 3 and "student_ppl" in info["metrics"]
    summary = json.loads((out / "summary.json").read_text())
    pruned_row = next(r for r in summary["table"] if r["model"] == "after 0-prune")
    final_row = next(r for r in summary["table"] if r["model"] == "student (final)")
    assert pruned_row["params"] == final_row["params"] < summary["table"][0]["params"]
    assert final_row["kl"] < pruned_row["kl"]  # the distill stage recovered some of what pruning lost
    assert "Stage 0: prune" in (out / "report.md").read_text()


@pytest.mark.slow
def test_rerun_does_not_prune_twice_and_importance_is_cached(pruned_run, tmp_path):
    recipe, out, _ = pruned_run
    info = out / "stages/0-prune/transform.json"
    before = info.stat().st_mtime_ns
    p = launch(recipe)
    assert p.returncode == 0, p.stderr[-3000:]
    assert info.stat().st_mtime_ns == before and "prune:" not in p.stdout and "already finished" in p.stdout
    # another target on the same model, data and calibration draw reuses the importance
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["output_dir"] = str(tmp_path / "out2")
    data["stages"] = [{**data["stages"][0], "num_hidden_layers": 2}]
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(data))
    p = launch(tmp_path / "r2.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "importance from cache" in p.stdout


@pytest.mark.slow
def test_budget_search_run(tiny_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "prune", "target_params": 0.5, "calibration_blocks": 8,
                                   "cache_dir": str(tmp_path / "imp"),
                                   "search": {"max_candidates": 4, "score_blocks": 4, "hidden_multiple": 16,
                                              "mlp_multiple": 16}}])
    p = launch(recipe)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads((tmp_path / "out/stages/0-prune/transform.json").read_text())
    assert abs(info["non_embedding_params"]["fraction"] - 0.5) <= 0.02 * 0.5
    assert len(info["candidates"]) == 4 and sum(bool(c.get("chosen")) for c in info["candidates"]) == 1
    chosen = next(c for c in info["candidates"] if c.get("chosen"))
    assert chosen["calib_kl"] == min(c["calib_kl"] for c in info["candidates"])
    assert {k: chosen[k] for k in info["shape"]} == info["shape"]
    assert "### candidates" in (tmp_path / "out/report.md").read_text()


@pytest.mark.parametrize("stage,message", [
    ({"num_attention_heads": 5}, "more than the model has"),
    ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"target_params": 1.0}, "target_params"),
    ({"target_params": 0}, "target_params"),
    ({"target_params": 0.05}, "no shape within"),
    ({"target_params": 0.5, "hidden_size": 32}, "one kind of target"),
    ({}, "needs a target"),
])
def test_bad_prune_input_fails_before_anything_is_written(tiny_teacher, tmp_path, stage, message):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "prune", **stage}, {"kind": "distill"}])
    p = launch(recipe)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_later_stage_is_checked_against_the_pruned_shape(tiny_teacher, tmp_path):
    # distill.hidden_layers=[3] fits the 4-layer teacher but not the 2-layer pruned student
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "prune", "num_hidden_layers": 2},
                                  {"kind": "distill", "hidden_weight": 1.0, "hidden_layers": [3]}])
    p = launch(recipe, "--dry-run")
    assert p.returncode == 2 and "the student has 2 layers" in p.stderr


def test_random_choice_baseline_has_the_same_shape():
    model = llama()
    shape = {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    a = make_plan(model.config, shape, random_stats(model.config, 0), "kl")
    b = make_plan(model.config, shape, activation_stats(model, blocks(), 4), "kl")
    assert shape_of(apply_plan(model, a).config) == shape_of(apply_plan(model, b).config) == shape
    assert (a.hidden, a.mlp) != (b.hidden, b.mlp)
    assert math.isclose(sum(len(x) for x in a.mlp), sum(len(x) for x in b.mlp))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: prune + LoRA distill in bf16 on CUDA")
def test_gpu_prune_then_lora_distill(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, student={"init": "teacher"}, train={"max_steps": 4},
                          stages=[{**PRUNE, "cache_dir": str(tmp_path / "imp")},
                                  {"kind": "distill", "lora": {"r": 2}}, {"kind": "distill", "max_steps": 2}])
    p = tiny.launch(recipe, gpu=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads((out / "final/compression.json").read_text())
    assert info["device"].startswith("cuda") and info["precision"] == "bf16", info["device"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert shape_of(model.config) == {k: PRUNE[k] for k in shape_of(model.config)}
    pruned = json.loads((out / "stages/0-prune/transform.json").read_text())["metrics"]
    assert info["metrics"]["final"]["kl"] < pruned["kl"]


@pytest.mark.slow
@pytest.mark.multi_rank
def test_two_ranks_prune_once_and_train_the_same_model(tiny_teacher, tmp_path):
    """Rank 0 prunes, both ranks load its result: the losses equal one rank with accumulation."""
    from compress.tracking import read_metrics
    from tests.test_multirank import deepspeed_cmd

    def recipe(name, **train):
        return write_recipe(tmp_path / f"{name}.yaml", tiny_teacher, tmp_path / name, student={"init": "teacher"},
                            train={"max_steps": 4, "micro_batch_size": 2, "zero_stage": 3, "save_every": 4, **train},
                            stages=[{**PRUNE, "cache_dir": str(tmp_path / "imp")}, {"kind": "distill"}])

    p = subprocess.run(deepspeed_cmd(recipe("two"), port=29631), capture_output=True, text=True, env=run_env(),
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("prune: {") == 1  # one rank pruned
    q = launch(recipe("one", grad_accum=2))
    assert q.returncode == 0, q.stderr[-3000:]
    loss = lambda out: torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])  # noqa: E731
    torch.testing.assert_close(loss(tmp_path / "two"), loss(tmp_path / "one"), rtol=1e-4, atol=1e-6)
    assert shape_of(AutoModelForCausalLM.from_pretrained(tmp_path / "two/final").config)["hidden_size"] == 48

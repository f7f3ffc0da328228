"""Stages that change the model: a one-shot transform (drop a layer, swap in masked linears chosen
on calibration data) then training, where the mask must hold through the optimizer's fp32 master
weights (bf16 on DeepSpeed's bf16 optimizer, ZeRO-1), through a later stage of another method,
through SIGKILL + resume, and in the export. The method is the plugin ``tests/toy_method.py``."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.tracking import read_metrics
from tests.tiny import REPO, kill_at_checkpoint, launch_cmd, run_env, write_recipe

TOY = {"kind": "toy_mask", "drop_layer": 1, "density": 0.5, "tighten_at": 4}
STAGE_DIR = "stages/0-toy_mask"


def toy_recipe(path, teacher, out, **train):
    return write_recipe(path, teacher, out, plugins=["tests.toy_method"], student={"init": "drop_layers", "keep_every": 1},
                        train={"max_steps": 12, "save_every": 2, "zero_stage": 1, "precision": "bf16", "lr": 1e-2,
                               **train},
                        stages=[TOY, {"kind": "distill", "max_steps": 3}])




def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def masks_of(state: dict) -> dict:
    return {k[: -len(".mask")]: v for k, v in state.items() if k.endswith(".mask")}


@pytest.fixture(scope="module")
def toy_run(tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    recipe = toy_recipe(tmp / "r.yaml", tiny_teacher, tmp / "out", keep_optimizer_states=True)
    p = run(launch_cmd(recipe))
    return recipe, tmp / "out", p


@pytest.mark.slow
def test_transform_then_training_keeps_the_mask(toy_run, tiny_teacher):
    recipe, out, _ = toy_run
    transformed = load_file(out / STAGE_DIR / "transformed/model.safetensors")
    trained = load_file(out / STAGE_DIR / "model/model.safetensors")
    masks = masks_of(trained)
    assert len(masks) == 3, "one masked down_proj per layer of the 3 kept (4 - dropped layer 1)"
    # the transform chose a 50% mask per row; training tightened it to 25% at step 4 (after_step)
    assert all(m.sum(1).eq(m.shape[1] // 4).all() for m in masks.values())
    assert all((m <= masks_of(transformed)[k]).all() for k, m in masks.items()), "tightening only removes"
    for name, mask in masks.items():
        w = trained[f"{name}.weight"]
        assert w[mask == 0].abs().max() == 0, f"{name}: masked weights came back through the master copy"
        assert not torch.equal(w[mask == 1], transformed[f"{name}.weight"][mask == 1]), "no training happened"

    # stage 1 (distill, another method) trained the same modules: the mask still holds in the export
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers: stock Linear, no masks
    assert final.config.num_hidden_layers == 3 and final.dtype == torch.bfloat16  # trained in bf16, exported so
    for i, layer in enumerate(final.model.layers):
        w = layer.mlp.down_proj.weight
        assert type(layer.mlp.down_proj) is torch.nn.Linear
        assert w[masks[f"model.layers.{i}.mlp.down_proj"] == 0].abs().max() == 0
    stage1 = load_file(out / "stages/1-distill/model/model.safetensors")
    assert not torch.equal(stage1["model.layers.0.mlp.down_proj.weight"], trained["model.layers.0.mlp.down_proj.weight"])
    densities = [r["density"] for r in read_metrics(out) if r.get("stage") == 0 and "density" in r]
    assert densities == [0.5] * 4 + [0.25] * 8, densities  # method state, as logged per step


@pytest.mark.slow
def test_finished_transform_and_stages_are_not_redone(toy_run):
    recipe, out, _ = toy_run
    before = (out / STAGE_DIR / "transformed/model.safetensors").stat().st_mtime_ns
    again = run(launch_cmd(recipe))
    assert "stage 0 (toy_mask) already finished" in again.stdout
    assert (out / STAGE_DIR / "transformed/model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_restores_mask_and_method_state(toy_run, tiny_teacher, tmp_path):
    _, ref_out, _ = toy_run
    out = tmp_path / "killed"
    recipe = toy_recipe(tmp_path / "r.yaml", tiny_teacher, out, keep_optimizer_states=True, max_steps=12)
    # past tighten_at=4: the tightened mask lives only in checkpoints
    killed_at = kill_at_checkpoint(launch_cmd(recipe), out / STAGE_DIR / "checkpoints", 6, timeout=300)
    assert 6 <= killed_at < 12 and not (out / STAGE_DIR / "model").exists()

    p = run(launch_cmd(recipe))
    assert f"resumed stage 0 (toy_mask) from step {killed_at}" in p.stdout
    ref, got = read_metrics(ref_out), read_metrics(out)
    ref_loss = torch.tensor([r["loss"] for r in ref if "loss" in r], dtype=torch.float64)
    got_loss = torch.tensor([r["loss"] for r in got if "loss" in r], dtype=torch.float64)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert [r["density"] for r in got if "density" in r] == [r["density"] for r in ref if "density" in r]
    a, b = load_file(out / "final/model.safetensors"), load_file(ref_out / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_no_checkpoints_left_after_a_stage_by_default(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = toy_recipe(tmp_path / "r.yaml", tiny_teacher, out, max_steps=2, precision="fp32", zero_stage=0)
    run(launch_cmd(recipe))
    # the stage result and the transform's small report stay; checkpoints and transformed/ are gone
    assert sorted(p.name for p in (out / STAGE_DIR).iterdir()) == ["model", "transform.json"]
    info = json.loads((out / "run.json").read_text())
    assert info["world"] == 1 and info["wandb_id"]


def _engine(model, zero_stage, bf16):
    import deepspeed

    from compress.pipeline import init_distributed
    from compress.recipe import TrainConfig
    from compress.train import ds_config

    init_distributed()
    tr = TrainConfig(micro_batch_size=2, zero_stage=zero_stage, precision="bf16" if bf16 else "fp32", grad_clip=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(tr, torch.device("cpu")))
    return engine


@pytest.mark.parametrize("zero_stage, bf16", [(0, True), (1, False), (2, False)])
def test_master_weights_undo_a_naive_mask_but_not_enforce(zero_stage, bf16):
    from compress.constraints import constrained_params, enforce
    from compress.pipeline import detached
    from tests.toy_method import MaskedLinear, magnitude_mask

    def train(project):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(cfg)
        layer = MaskedLinear(32, 16)
        layer.mask.copy_(magnitude_mask(torch.rand(16, 32), 0.5))
        model.model.layers[0].mlp.down_proj = layer
        engine = _engine(model, zero_stage, bf16)
        project(engine)
        for _ in range(3):
            x = torch.randint(0, 64, (2, 8))
            engine.backward(engine(input_ids=x).logits.float().pow(2).mean())
            engine.step()
            project(engine)
        # what the next step, the next stage and the export start from (the master copy)
        kept = detached(engine.module, torch.device("cpu")).model.layers[0].mlp.down_proj
        return kept.weight.detach()[kept.mask == 0].abs().max().item()

    def naive(engine):  # what a hook that sees only engine.module would do
        m = engine.module.model.layers[0].mlp.down_proj
        m.weight.data.mul_(m.mask.to(m.weight.dtype))

    # the optimizer's fp32 master copy (bf16 optimizer, ZeRO partitions) restores the masked weights
    assert train(naive) > 0
    assert train(lambda e: enforce(constrained_params(e.module))) == 0

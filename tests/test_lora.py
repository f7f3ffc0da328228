"""LoRA on a training stage: only low-rank updates of the targeted linears, folded into plain
weights before the stage result and the export (fp32 master copies under ZeRO-1)."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import REPO, run_env, write_recipe


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_lora_distill_changes_only_low_rank_parts(tiny_teacher, tmp_path, zero_stage):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          train={"max_steps": 4, "zero_stage": zero_stage, "lr": 1e-2},
                          stages=[{"kind": "distill", "lora": {"r": 2, "alpha": 4, "targets": ["q_proj", "down_proj"]}}])
    p = subprocess.run([sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe)],
                       capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    before = load_file(tiny_teacher / "model.safetensors")
    after = load_file(tmp_path / "out/final/model.safetensors")
    assert not [k for k in after if "lora" in k or "base_layer" in k]
    assert set(before) - {"lm_head.weight"} <= set(after)
    for name, w in before.items():
        if name not in after:
            continue
        delta = after[name].float() - w.float()
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            assert delta.abs().max() > 1e-5, f"{name} did not train"
            assert torch.linalg.matrix_rank(delta, rtol=1e-4) <= 2, f"{name} changed by more than rank 2"
        else:
            assert torch.equal(after[name], w), f"{name} is frozen under LoRA but changed"


def test_lora_on_a_stage_that_does_not_train_is_refused(tiny_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "out", student={"init": "teacher"},
                          stages=[{"kind": "prune", "num_hidden_layers": 2, "lora": {"r": 4}}])
    p = subprocess.run([sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe), "--dry-run"],
                       capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert p.returncode == 2 and "does not train" in p.stderr

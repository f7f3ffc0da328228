"""End to end on tiny models, the way users run it: `python launch/distill.py --recipe ...`."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.tracking import read_metrics
from tests import tiny
from tests.tiny import make_tiny_model, write_recipe

pytestmark = pytest.mark.slow

RANDOM_STUDENT = {"init": "config", "config": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}}


def launch(recipe, *overrides, check=True):
    p = tiny.launch(recipe, *overrides)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_distill_end_to_end(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, student=RANDOM_STUDENT,
                          train={"max_steps": 12, "lr": 1e-2, "save_every": 4, "keep_optimizer_states": True},
                          stages=[{"kind": "distill", "loss": "forward_kl", "ce_weight": 0.5}])
    p = launch(recipe)
    assert "| student (final) |" in p.stdout and "top1_agreement" in p.stdout

    model = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, no code of ours
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert len(tok) == 49152

    info = json.loads((out / "final/compression.json").read_text())
    assert info["recipe"]["train"]["max_steps"] == 12
    assert info["teacher"]["source"] == str(tiny_teacher)
    assert [s["kind"] for s in info["stages"]] == ["distill"]
    init, final = info["metrics"]["init"], info["metrics"]["final"]
    assert final["kl"] < 0.8 * init["kl"], (init, final)  # distillation moved the student to the teacher
    assert info["bytes_on_disk"] == (out / "final/model.safetensors").stat().st_size

    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"kd", "ce", "lr", "step_time"} <= set(steps[0])
    assert steps[0]["lr"] < steps[2]["lr"], "warmup"
    assert (out / "recipe.yaml").is_file()
    ckpts = sorted(p.name for p in (out / "stages/0-distill/checkpoints").iterdir())
    assert ckpts == ["step_0000008", "step_0000012"], ckpts  # keep_checkpoints=2
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:  # DeepSpeed's op: in this venv
        assert list(Path(sys.prefix, "torch_extensions").glob("deepspeed_shm_comm/*.so"))


def test_multi_stage_and_finished_stages_are_skipped(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, train={"max_steps": 3}, wandb={"mode": "offline"},
                          stages=[{"kind": "finetune"}, {"kind": "distill", "loss": "jsd", "max_steps": 2}])
    launch(recipe)
    rows = read_metrics(out)
    assert {(r["stage"], r["step"]) for r in rows if "loss" in r} == {(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)}
    assert "kd" not in [r for r in rows if r["stage"] == 0][0], "finetune has no teacher loss"
    # once a stage's result is saved, its optimizer checkpoints are gone (keep_optimizer_states: false)
    assert sorted(p.name for p in (out / "stages/0-finetune").iterdir()) == ["model"]
    assert not (out / "stages/1-distill/checkpoints").exists()
    first = (out / "final/model.safetensors").read_bytes()
    again = launch(recipe)
    assert "stage 0 (finetune) already finished" in again.stdout
    assert "stage 1 (distill) already finished" in again.stdout
    assert (out / "final/model.safetensors").read_bytes() == first
    # both starts logged into one wandb run, whose id run.json keeps
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs

    changed = launch(recipe, "train.lr=0.01", check=False)
    assert changed.returncode == 2 and "different recipe" in changed.stderr


def test_hidden_state_kd_with_projection(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, student=RANDOM_STUDENT,
                          train={"max_steps": 8, "lr": 3e-3},
                          stages=[{"kind": "distill", "hidden_weight": 1.0, "hidden_layers": [0, -1], "top_k": 32}])
    launch(recipe)
    rows = [r for r in read_metrics(out) if "hidden_mse" in r]
    assert len(rows) == 8 and rows[-1]["hidden_mse"] < rows[0]["hidden_mse"]
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    assert exported.config.hidden_size == 32  # the 32->64 projection trained beside it is not exported


def test_offline_kd_equals_online_topk(tiny_teacher, tmp_path):
    def run(name, offline):
        stage = {"kind": "distill", "top_k": 16, "temperature": 2.0}
        if offline:
            stage["offline"] = {"shard_blocks": 4}
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_teacher, tmp_path / name, student=RANDOM_STUDENT,
                              train={"max_steps": 5}, stages=[stage])
        launch(recipe)
        return [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]

    online, offline = run("online", False), run("offline", True)
    # the cache stores 8-bit log-prob codes: equal up to that rounding
    torch.testing.assert_close(torch.tensor(offline), torch.tensor(online), rtol=2e-3, atol=1e-4)
    cache = tmp_path / "offline/stages/0-distill/teacher_topk"
    shards = sorted(cache.glob("shard_*.safetensors"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["blocks"]) <= 5 * 2 and len(shards) == -(-len(manifest["blocks"]) // 4)
    assert manifest["format"] == "topk-v2" and manifest["k"] == 16 and 0 < manifest["recon_kl"] < 1e-4


def test_student_with_padded_vocabulary(tiny_teacher, tmp_path):
    # Same tokenizer, embedding rounded up by 64 padding rows: KD runs over the shared ids.
    student = make_tiny_model(tmp_path / "student", layers=2, hidden=32, seed=3, vocab_pad=64)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, train={"max_steps": 3},
                          student={"init": "checkpoint", "path": str(student)},
                          stages=[{"kind": "distill", "loss": "reverse_kl", "top_k": 8}])
    launch(recipe)
    before = AutoModelForCausalLM.from_pretrained(student).get_output_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(out / "final").get_output_embeddings().weight
    assert after.shape[0] == 49152 + 64
    # padding rows are outside every softmax (no token id reaches them either): no gradient, so
    # they leave training bit-identical, while the shared rows moved
    assert torch.equal(after[49152:], before[49152:])
    assert not torch.equal(after[:49152], before[:49152])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 training path")
def test_gpu_run_trains_in_bf16(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, train={"max_steps": 4})
    p = tiny.launch(recipe, gpu=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads((out / "final/compression.json").read_text())
    assert info["device"].startswith("cuda"), info["device"]
    assert info["precision"] == "bf16"  # auto on a GPU: bf16 compute, fp32 master weights
    assert info["metrics"]["final"]["kl"] < info["metrics"]["init"]["kl"]
    assert AutoModelForCausalLM.from_pretrained(out / "final").dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["TORCH_EXTENSIONS_DIR/op", "~/.cache/torch_extensions/py311_cpu/op"])
def test_a_stale_extension_build_lock_is_refused_not_waited_on(tmp_path, monkeypatch, where):
    """A JIT build killed midway leaves its lock, and DeepSpeed's next start would wait forever;
    one older than STALE_LOCK_S is refused naming the file, a fresh one (a build running) is not.
    Both of torch's layouts: the op's folder right in TORCH_EXTENSIONS_DIR, or in the home cache
    under a python/cuda folder."""
    from compress.errors import CompressError
    from compress.pipeline import STALE_LOCK_S, check_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # only these folders
    root = tmp_path / "own" if where.startswith("TORCH") else tmp_path / "home/.cache/torch_extensions/py311_cpu"
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    now = lock.stat().st_mtime
    check_build_locks(now + 60)  # a build in progress: waited on, as DeepSpeed does
    with pytest.raises(CompressError, match=f"{lock}.*delete it"):
        check_build_locks(now + STALE_LOCK_S + 60)
    os.remove(lock)
    check_build_locks(now + STALE_LOCK_S + 60)


def test_deepspeed_ops_are_built_in_the_environment_not_in_the_shared_home_cache(monkeypatch):
    """Two venvs sharing ~/.cache/torch_extensions rebuild the op in turn under one lock; ours builds in its own."""
    from compress.pipeline import extensions_dir

    monkeypatch.setattr(sys, "prefix", "/opt/venv-a")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert extensions_dir() == "/opt/venv-a/torch_extensions"
    monkeypatch.setattr(sys, "base_prefix", "/opt/venv-a")  # no venv: torch's default
    assert extensions_dir() is None


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    """Two runs in one output_dir would mix checkpoints and exports (seen here: a benchmark started
    twice); the second is refused naming the first's pid, and the folder is free once it ends."""
    import subprocess
    import sys

    from compress.errors import CompressError
    from compress.pipeline import _held, hold_output_dir

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from compress.pipeline import hold_output_dir; "
                               f"hold_output_dir(__import__('pathlib').Path({str(out)!r})); print('held', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CompressError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            hold_output_dir(out)
    finally:
        holder.kill()
        holder.wait()
    hold_output_dir(out)  # released when its holder died (as after a SIGKILL)
    hold_output_dir(out)  # and re-entrant in this process
    _held.pop(str(out.resolve())).close()

"""Tiny real models for tests: SmolLM2's real tokenizer on a small Llama built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def make_tiny_model(out: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0, vocab_pad: int = 0,
                    init_std: float = 0.2) -> Path:
    """Save a tiny LlamaForCausalLM with the default teacher's tokenizer into ``out``.

    A large ``init_std`` gives peaked next-token distributions, so a student has something to learn.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init_std,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_recipe(path: Path, teacher_dir: Path, output_dir: Path, **sections) -> Path:
    """A small, fast recipe on the tiny teacher and a slice of the real text."""
    recipe = {
        "output_dir": str(output_dir),
        "seed": 0,
        "teacher": {"source": str(teacher_dir)},
        "student": {"init": "drop_layers", "keep_every": 2},
        "data": {"source": "python-docs", "block_size": 32, "max_docs": 40, "val_fraction": 0.2,
                 "cache_dir": str(REPO / ".cache/test-data")},
        "train": {"max_steps": 6, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "save_every": 3,
                  "log_every": 1, "eval_blocks": 8},
        "stages": [{"kind": "distill"}],
        "wandb": {"mode": "disabled"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch_cmd(recipe: Path, *extra: str) -> list[str]:
    """The command line of a real run: launch/distill.py on ``recipe`` (plus overrides / flags)."""
    import sys

    return [sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe), *extra]


def launch(recipe: Path, *extra: str, timeout: int = 600, gpu: bool = False):
    """Run launch/distill.py to its end; the CompletedProcess (output captured as text). ``gpu``:
    without DS_ACCELERATOR, so DeepSpeed finds the GPU."""
    import subprocess

    env = {k: v for k, v in run_env().items() if not (gpu and k == "DS_ACCELERATOR")}
    return subprocess.run(launch_cmd(recipe, *extra), capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def kill_at_checkpoint(cmd: list[str], ckpts: Path, step: int, timeout: float = 400) -> int:
    """Start ``cmd`` (a run, in its own process group), SIGKILL the whole group once ``ckpts``
    holds a complete checkpoint at ``step`` or later, and return the latest one left."""
    import signal
    import subprocess
    import tempfile
    import time

    from compress.checkpoint import latest_step

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env(), cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + timeout
    while (latest_step(ckpts) or 0) < step:
        if proc.poll() is not None or time.time() > deadline:
            why = "the run ended before it could be killed" if proc.poll() is not None else "no checkpoint appeared"
            if proc.poll() is None:  # do not leave it running past the test
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.seek(0)
            raise AssertionError(f"{why}; its output ends with:\n{log.read()[-4000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-run
    proc.wait()
    return latest_step(ckpts)

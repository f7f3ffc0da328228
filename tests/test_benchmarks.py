"""Every arm of every sweep benchmark is a recipe that passes the pre-flight checks: a schema or
check change that breaks a benchmark fails here, not an hour into a run."""

import importlib
import json

import pytest

from benchmarks.common import arm_overrides
from compress.models import check_fit
from compress.recipe import load_recipe

SWEEPS = ["gqa", "on_policy", "prune_kd", "qat_kd", "sparsity", "upcycle"]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_benchmark_arm_is_a_valid_recipe(name):
    bench = importlib.import_module(f"benchmarks.{name}")
    recipe_path = getattr(bench, "RECIPE", None) or bench.DEFAULT_RECIPE
    assert bench.ARMS
    for arm, definition in bench.ARMS.items():  # the overrides run_sweep gives it
        recipe = load_recipe(recipe_path, arm_overrides(definition, 1, ["wandb.mode=disabled"]))
        check_fit(recipe)  # the stage checks against the model configs, no weights loaded
        assert recipe.stages, arm


def test_qat_benchmark_pairs_every_qat_arm_with_its_format():
    from benchmarks import qat_kd

    for arm in qat_kd.ARMS:
        if arm.startswith("qat_kd_"):
            assert f"rtn_{qat_kd.format_of(arm)}" in qat_kd.ARMS, arm  # its recovery verdict has a baseline
    assert qat_kd.format_of("qat_kd_gptq_blockwise_lr1e-3_int4_g64") == "int4_g64"
    assert qat_kd.format_of("qat_kd_gptq_int4_g64_600") == "int4_g64"
    stats = {a: {m: {"mean": v, "std": 0.01} for m, v in (("ppl_ratio", r), ("kl", k), ("top1_agreement", 0.8))}
             for a, r, k in (("rtn_nvfp4", 1.2, 0.3), ("qat_kd_nvfp4", 1.02, 0.03), ("qat_kd_gptq_nvfp4", 1.1, 0.2))}
    v = qat_kd._verdict(stats)
    assert v["qat_kd_nvfp4 recovers >= 90% of rtn_nvfp4's kl gap"].startswith("met (90%")
    assert v["qat_kd_gptq_nvfp4 recovers >= 90% of rtn_nvfp4's ppl_ratio gap"].startswith("not met (50%")
    goals = {"qat_kd_int4_g64": (1.02, 0.15, 0.83), "qat_kd_gptq_int4_g64": (1.06, 0.18, 0.79)}
    v = qat_kd._verdict({a: {m: {"mean": x, "std": 0.005} for m, x in zip(("ppl_ratio", "kl", "top1_agreement"), xs)}
                         for a, xs in goals.items()})
    assert [v[f"qat_kd_int4_g64 {m}"].split(" (")[0] for m in ("ppl_ratio goal 1.05", "kl goal 0.17",
                                                                "top1_agreement goal 0.8")] == ["met"] * 3
    assert [v[f"qat_kd_gptq_int4_g64 {m}"].split(" (")[0] for m in ("ppl_ratio goal 1.05", "kl goal 0.17",
                                                                     "top1_agreement goal 0.8")] == ["not met"] * 3


def test_a_run_made_before_a_new_optional_field_is_still_the_same_recipe():
    from benchmarks.common import same_recipe

    old = {"seed": 0, "stages": [{"kind": "sparsify", "method": "sparsegpt"}]}
    assert same_recipe(old, {"seed": 0, "stages": [{"kind": "sparsify", "method": "sparsegpt", "blockwise": None}]})
    assert not same_recipe(old, {"seed": 0, "stages": [{"kind": "sparsify", "method": "sparsegpt",
                                                          "blockwise": {"epochs": 2}}]})  # the new option is on
    assert not same_recipe(old, {"seed": 1, "stages": old["stages"]})
    assert not same_recipe(old, {"seed": 0, "stages": [*old["stages"], {"kind": "distill"}]})
    assert not same_recipe(old, {"seed": 0, "stages": [{"kind": "sparsify", "method": "wanda"}]})
    # an option added later with a default other than None: an earlier run ran with that default
    ptq = {"seed": 0, "stages": [{"kind": "quantize", "weights": {"bits": 4}}]}
    assert same_recipe(ptq, {"seed": 0, "stages": [{"kind": "quantize", "weights": {"bits": 4, "observer": "minmax"}}]})
    assert not same_recipe(ptq, {"seed": 0, "stages": [{"kind": "quantize", "weights": {"bits": 4, "observer": "mse"}}]})


def test_a_benchmark_run_keeps_its_results_and_final_model_but_not_the_stage_snapshots(tmp_path, tiny_teacher):
    """A real run through the sweeps' runner: summary and final model stay (--reuse, speed and task checks
    read them); the per-stage resume snapshots, a full model each, are deleted once the run has finished."""
    from benchmarks.common import BENCH_ENV, finished, plan_run, run_recipe
    from tests.tiny import run_env, write_recipe

    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "unused")
    out, overrides, recipe = plan_run("tiny", recipe_path, tmp_path / "runs/arm/seed0",
                                      ["train.max_steps=2", "stages=[{kind: distill}, {kind: distill, max_steps: 1}]"])
    result = run_recipe("tiny", recipe_path, out, overrides, recipe, {**run_env(), **BENCH_ENV}, echo=False)
    assert result["reused"] is False and result["final"]["student_ppl"] > 0
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["0-distill", "1-distill"]
    assert not list((out / "stages").glob("*/model")), "stage snapshots left behind"
    assert (out / "final/model.safetensors").is_file() and (out / "final/config.json").is_file()
    again = finished(out, recipe)
    assert again["reused"] and again["final"] == result["final"] and again["seconds"] > 0


def test_the_readme_gqa_figure_reads_every_committed_result_it_names(tmp_path):
    """The figure is drawn from committed result pages: a renamed page or arm fails here, and the bars
    are those pages' numbers."""
    import json

    from benchmarks import gqa

    drawn = gqa.summary_figure(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(drawn) == list(gqa.FIGURE)
    for merge, refs in gqa.FIGURE.items():
        for ref, value in zip(refs, drawn[merge]):
            if ref is None:
                assert value is None
                continue
            page = json.loads((gqa.REPO / "benchmarks/results" / f"{ref[0]}.json").read_text())
            assert value == page["summary"][ref[1]]["ppl_ratio"] and value["mean"] >= 1.0


def test_a_results_page_built_partly_from_earlier_runs_says_so_beside_its_wall_time():
    """With --reuse the wall time is the last invocation's alone (a 24 min header over 105 min of runs):
    the page must say how many runs came from before and what all of them took."""
    from argparse import Namespace

    from benchmarks.common import arm_stats, arms_markdown

    def run(seconds, reused, ppl):
        return {"seconds": seconds, "reused": reused, "device": "cpu", "precision": "fp32",
                "final": {"student_ppl": ppl}, "bytes_on_disk": 1, "table": [{}]}

    args = Namespace(arms="a", seeds="0,1", jobs=1, set=[], tasks="", tag="t")
    metrics = {"ppl": ("student_ppl", "lower")}

    def header(results):
        md = arms_markdown("T", "x.py", args, arm_stats(results, metrics), metrics, {}, 600.0, results, "", {}, {})
        return next(line for line in md.splitlines() if line.startswith("Wall time"))

    assert header({"a": {0: run(1200.0, True, 13.0), 1: run(600.0, False, 13.1)}}) == (
        "Wall time: 10.0 min (1 of 2 runs reused from earlier invocations; every run's own time: 30.0 min). "
        "Device: cpu (fp32).")
    assert header({"a": {0: run(500.0, False, 13.0), 1: run(600.0, False, 13.1)}}) == \
        "Wall time: 10.0 min. Device: cpu (fp32)."


def test_aggregating_where_no_run_finished_is_an_error_that_writes_no_results_page(tmp_path):
    """--aggregate over a wrong --runs once overwrote a committed page with an empty table."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    tag = "test_aggregate_nothing"
    p = subprocess.run([sys.executable, "benchmarks/upcycle.py", "--arms", "dense", "--seeds", "0", "--aggregate",
                        "--runs", str(tmp_path / "no_runs"), "--tag", tag], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 1 and "no finished run of arms dense seeds 0 under" in p.stderr, p.stderr[-2000:]
    assert not list((repo / "benchmarks/results").glob(f"{tag}*"))


def test_a_finished_run_is_found_whichever_way_its_folder_is_named(tmp_path):
    """--runs relative from the worktree that ran it, or absolute from another checkout: the same run.
    Anything else in the recipe still has to match."""
    import json

    from benchmarks.common import finished

    out = tmp_path / "dense" / "seed0"
    out.mkdir(parents=True)
    recipe = {"output_dir": "runs/bench/dense/seed0", "seed": 0, "stages": [{"kind": "finetune"}]}
    (out / "summary.json").write_text(json.dumps({"recipe": recipe, "metrics": {"init": {}, "final": {"ppl": 13.0}}}))
    assert finished(out, {**recipe, "output_dir": str(out)})["final"] == {"ppl": 13.0}
    assert finished(out, {**recipe, "output_dir": str(out), "seed": 1}) is None


def test_a_run_whose_check_the_time_budget_cut_short_is_checked_again_on_every_prompt(tmp_path, tiny_teacher,
                                                                                       monkeypatch):
    """The on-policy sweep judges every 24-layer arm on the same prompts: a run whose in-run check
    stopped at its time budget is checked again on its export with none, once (then reused), and
    its acceptance is read from that check. Greedy, so the first prompt's counts are the same."""
    from benchmarks import on_policy
    from benchmarks.common import BENCH_ENV, plan_run, run_recipe
    from tests.tiny import run_env, write_recipe

    monkeypatch.setattr(on_policy, "PROMPTS_24", 3)
    check = "{ks: [4], prompts: 3, max_new_tokens: 48, compare_hf: false, time_budget_s: 1.0e-9}"
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "unused")
    plans = {("x_24l", 0): plan_run("tiny", recipe_path, tmp_path / "runs/x_24l/seed0",
                                    ["train.max_steps=1", "student={init: teacher}",  # a draft that is not hopeless
                                     f"stages=[{{kind: distill}}, {{kind: eval, tasks: [], eval_blocks: 1, "
                                     f"speculative: {check}}}]"])}
    out, overrides, recipe = plans["x_24l", 0]
    run_recipe("tiny", recipe_path, out, overrides, recipe, {**run_env(), **BENCH_ENV}, echo=False)
    in_run = json.loads((out / "summary.json").read_text())["eval"]
    results = {"x_24l": {0: {"eval": in_run}}}
    assert in_run["speculative"][0]["n_prompts"] == 1  # the budget stopped it after the first prompt
    on_policy.recheck(results, plans)
    full = on_policy.speculative(results["x_24l"][0])
    assert full["n_prompts"] == 3 and full["stopped"] is None
    assert full["per_prompt"][0] == in_run["speculative"][0]["per_prompt"][0]
    saved = out / "eval_spec_all/eval.json"
    written = saved.stat().st_mtime_ns
    on_policy.recheck({"x_24l": {0: {"eval": in_run}}}, plans)  # found, not run again
    assert saved.stat().st_mtime_ns == written


def test_a_seed_whose_run_is_gone_is_taken_from_its_results_page_only_if_it_is_the_same_run(tmp_path, monkeypatch):
    """--pages: a fresh checkout has the committed pages, not the runs behind them. A page's seed stands
    in for its run only where the page ran the same arm definition with the same --set and, where the
    page holds it, the same resolved recipe; the page's result comes through whole, marked as such."""
    import json
    from argparse import Namespace
    from pathlib import Path

    import pytest

    from benchmarks import common

    arms = {"kd": ("{init: teacher}", "[{kind: distill}]", ["train.max_steps=5"]),
            "ce": ("{init: teacher}", "[{kind: finetune}]", ["train.max_steps=5"])}
    runs = tmp_path / "runs"

    def resolved(arm, seed):  # the recipe run_sweep plans for (arm, seed)
        return common.plan_run("x", common.DEFAULT_RECIPE, Path(runs) / arm / f"seed{seed}",
                               common.arm_overrides(arms[arm], seed, []))[2]

    def result(ppl, recipe=None):
        return {"final": {"student_ppl": ppl}, "seconds": 60.0, "bytes_on_disk": 1, "table": [{}], "device": "cpu",
                "precision": "fp32", **({"recipe": recipe} if recipe else {})}

    page = {"args": {"set": []},
            "arms": {"kd": list(arms["kd"]), "ce": [*arms["ce"][:2], ["train.max_steps=6"]]},  # ce: another budget
            "per_seed": {"kd": {"0": result(13.0),  # an older page: no recipe, the arm decides
                                "1": result(13.2, resolved("kd", 1)),
                                "2": result(99.0, resolved("kd", 1))},  # seed 1's recipe: not seed 2's run
                         "ce": {"0": result(14.0)}}}
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "old.json").write_text(json.dumps(page))

    def sweep(arm_names, extra):
        args = Namespace(arms=arm_names, seeds="0,1,2", jobs=1, runs=str(runs), set=extra, tag="t", reuse=False,
                         aggregate=True, tasks="", pages="old")
        return common.run_sweep(arms, common.DEFAULT_RECIPE, args)[0]

    got = sweep("kd,ce", [])
    assert {s: r["final"]["student_ppl"] for s, r in got["kd"].items()} == {0: 13.0, 1: 13.2}
    assert got["ce"] == {} and all(r["page"] == "old" and r["reused"] for r in got["kd"].values())
    assert common.arm_stats(got, {"ppl": ("student_ppl", "lower")})["kd"]["ppl"]["mean"] == pytest.approx(13.1)
    with pytest.raises(SystemExit, match="no finished run"):  # other overrides for every run: not the page's runs
        sweep("kd", ["train.lr=1.0e-4"])


def test_qat_benchmark_reads_the_curve_of_a_run_evaluated_during_training(tmp_path):
    from benchmarks import qat_kd

    rows = [{"stage": 0, "step": 0, "transformed/kl": 0.12, "transformed/ppl_ratio": 1.09,
             "transformed/top1_agreement": 0.81},
            {"stage": 0, "step": 10, "train/loss": 0.3},
            *({"stage": 0, "step": st, "eval/kl": k, "eval/ppl_ratio": 1.0, "eval/top1_agreement": 0.82}
              for st, k in ((150, 0.105), (300, 0.1)))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arm = "qat_kd_gptq_blockwise_int4_g64_600"
    curves = qat_kd._curves({arm: {0: {}}}, {(arm, 0): (str(tmp_path), {}, {})})
    assert [(p["step"], p["kl"]) for p in curves[arm][0]] == [(0, 0.12), (150, 0.105), (300, 0.1)]
    assert "| qat_kd_gptq_blockwise_int4_g64_600 | 0 | 300 |" in qat_kd._curves_markdown(curves).replace("  ", " ")
    # a run evaluated only at its end has no curve
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert qat_kd._curves({arm: {0: {}}}, {(arm, 0): (str(tmp_path), {}, {})}) == {}

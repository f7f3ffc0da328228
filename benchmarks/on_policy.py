"""On-policy KD (GKD) vs off-policy KD vs CE at equal steps and tokens, judged as a speculative draft.

    .venv/bin/python benchmarks/on_policy.py [--arms ce,kd,on_policy,seq_kd] [--seeds 0,1,2] [--jobs 1]

Every arm is a real run of launch/distill.py on the default recipe (the 16-layer drop-layers student
of SmolLM2-135M-Instruct; the seed sets the data order and the on-policy draws), the training stage
followed by an eval stage that runs only the speculative-decoding check: the student drafts k = 4
tokens for its teacher on held-out prompts, greedy, output checked equal to the teacher's own.
`on_policy` samples half of its micro batches' continuations from the student (GKD, lmbda 0.5,
32-token prompts, temperature 1), `seq_kd` from the teacher (sequence-level KD). Reported: held-out
perplexity ratio, KL and top-1 agreement with the teacher, and draft acceptance at k = 4
(DistillSpec, Zhou et al. 2024: KD-trained drafts accept more). Goal (issue 18): the on-policy
student accepts more than the off-policy one and the CE one, beyond the seed spread.

The `*_24l` arms start from a stronger student instead: the teacher with its 6 least important
layers removed by a `prune` stage (calibration KL), so the student's own samples are fluent text
from the first step, as GKD's supervised students' are; `on_policy_greedy_24l` samples them greedily
(a greedy draft is judged on the teacher's greedy path, which a close student's greedy path follows).
`on_policy_l1_24l` is GKD's fully on-policy setting (lmbda 1: every batch is the student's own).
`skd_24l` / `skd_greedy_24l` interleave (SKD, Xu et al. 2024): the student proposes each token and the
teacher keeps it when it is among its 25 / 5 most probable, else writes its own.
Their acceptance is measured on 32 prompts instead of 8, all of them for every run: where the in-run
check's time budget stopped it early, the export is checked again with none (`recheck`).
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import (BENCH_ENV, DEFAULT_RECIPE, arm_stats, arms_markdown, compare,  # noqa: E402
                               evaluate_export, mean_std, run_sweep, sweep_arguments, sweep_payload, write_results)
from eval import stage as _eval_stage  # noqa: E402  (registers `kind: eval` for the recipe checks)

K = 4
# the eval strings below leave the check's time budget at its default; launch/evaluate.py (the re-check)
# leaves its prompt length at the default: both read here, so the two checks cut the same prompts
BUDGET_S = _eval_stage.SpeculativeCheck().time_budget_s
PROMPT_TOKENS = _eval_stage.SpeculativeCheck().prompt_tokens
PROMPTS, PROMPTS_24 = 8, 32  # held-out prompts the acceptance is measured on ...
NEW_TOKENS = 48  # ... and the tokens generated for each


def _eval(prompts: int) -> str:
    return (f"{{kind: eval, tasks: [], speculative: {{ks: [{K}], prompts: {prompts}, prompt_tokens: {PROMPT_TOKENS}, "
            f"max_new_tokens: {NEW_TOKENS}, compare_hf: false}}}}")


EVAL = _eval(PROMPTS)
# the 24-layer arms' acceptance on 4x the prompts: with 8 x 48 tokens the binomial noise of one
# run's rate (~0.02 at 0.3) is as large as the seed spread it is compared against
EVAL_24 = _eval(PROMPTS_24)
STUDENT = "{init: drop_layers, keep_every: 2}"
TRAIN = ["train.max_steps=60", "train.micro_batch_size=4"]
ON_POLICY = "{lmbda: 0.5, prompt_tokens: 32, temperature: 1.0}"
ON_POLICY_GREEDY = "{lmbda: 0.5, prompt_tokens: 32, temperature: 0.0}"
ON_POLICY_FULL = "{lmbda: 1.0, prompt_tokens: 32, temperature: 1.0}"  # GKD's fully on-policy setting
PRUNE_24 = "{kind: prune, num_hidden_layers: 24}"
# each on-policy arm against the arms that start from the same student
RIVALS = {"on_policy": ("kd", "ce", "seq_kd"), "kd_then_on_policy": ("kd", "ce", "on_policy", "kd_two_stages"),
          "kd_then_on_policy_cool": ("kd", "ce", "on_policy", "kd_two_stages"),
          "kd_then_on_policy_greedy": ("kd", "ce", "kd_two_stages"), "on_policy_24l": ("kd_24l", "ce_24l"),
          "on_policy_greedy_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "on_policy_jsd_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "on_policy_rkl_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "on_policy_l1_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "seq_kd_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "seq_kd_greedy_24l": ("kd_24l", "ce_24l", "on_policy_24l"),
          "skd_24l": ("kd_24l", "ce_24l", "on_policy_24l", "seq_kd_greedy_24l"),
          "skd_greedy_24l": ("kd_24l", "ce_24l", "on_policy_24l", "seq_kd_greedy_24l")}
ARMS = {
    "ce": (STUDENT, f"[{{kind: finetune}}, {EVAL}]", TRAIN),
    "kd": (STUDENT, f"[{{kind: distill, loss: forward_kl}}, {EVAL}]", TRAIN),
    "on_policy": (STUDENT, f"[{{kind: distill, loss: forward_kl, on_policy: {ON_POLICY}}}, {EVAL}]", TRAIN),
    # GKD's order: a supervised (here KD) student first, then on-policy, at the same 60 steps in all
    "kd_then_on_policy": (STUDENT, f"[{{kind: distill, loss: forward_kl, max_steps: 30}}, {{kind: distill, "
                                   f"loss: forward_kl, max_steps: 30, on_policy: {ON_POLICY}}}, {EVAL}]", TRAIN),
    # the same, with fewer and cooler student samples (lmbda 0.25, temperature 0.7, top_p 0.9)
    "kd_then_on_policy_cool": (STUDENT, f"[{{kind: distill, loss: forward_kl, max_steps: 30}}, {{kind: distill, "
                                        f"loss: forward_kl, max_steps: 30, on_policy: {{lmbda: 0.25, prompt_tokens: 32, "
                                        f"temperature: 0.7, top_p: 0.9}}}}, {EVAL}]", TRAIN),
    # the same with greedy student continuations: the states a greedy draft visits when it is judged
    # (DistillSpec, Zhou et al. 2024: match the training data to how the draft decodes)
    "kd_then_on_policy_greedy": (STUDENT, f"[{{kind: distill, loss: forward_kl, max_steps: 30}}, {{kind: distill, "
                                          f"loss: forward_kl, max_steps: 30, on_policy: {ON_POLICY_GREEDY}}}, {EVAL}]",
                                 TRAIN),
    # the control for the arms above: the same two 30-step stages (each re-warms the learning rate), both KD
    "kd_two_stages": (STUDENT, f"[{{kind: distill, loss: forward_kl, max_steps: 30}}, {{kind: distill, "
                               f"loss: forward_kl, max_steps: 30}}, {EVAL}]", TRAIN),
    # a stronger student: the teacher with its 6 least important layers cut (calibration KL; `prune`),
    # whose own samples are text from the start, as GKD's supervised students are
    "ce_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: finetune}}, {EVAL_24}]", TRAIN),
    "kd_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl}}, {EVAL_24}]", TRAIN),
    "on_policy_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: {ON_POLICY}}}, "
                                         f"{EVAL_24}]", TRAIN),
    # greedy student continuations: a greedy draft is judged only on the teacher's greedy path, and a
    # student this close to its teacher mostly walks that path when it decodes greedily too
    "on_policy_greedy_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: "
                                                f"{ON_POLICY_GREEDY}}}, {EVAL_24}]", TRAIN),
    # GKD's finding (Agarwal et al. 2024): on student samples, mode-seeking divergences (generalized
    # JSD, reverse KL) beat forward KL; the same on-policy data as on_policy_24l with those losses
    "on_policy_jsd_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: jsd, beta: 0.5, on_policy: "
                                             f"{ON_POLICY}}}, {EVAL_24}]", TRAIN),
    "on_policy_rkl_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: reverse_kl, on_policy: "
                                             f"{ON_POLICY}}}, {EVAL_24}]", TRAIN),
    # GKD's fully on-policy setting (lmbda 1): every batch is the student's own continuation of a prompt
    "on_policy_l1_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: "
                                            f"{ON_POLICY_FULL}}}, {EVAL_24}]", TRAIN),
    # sequence-level KD from the 24-layer student: half the micro batches continued by the teacher,
    # sampled or greedy. A greedy draft is judged only on the teacher's greedy path (an accepted token
    # is the teacher's), so the teacher's greedy continuations are exactly the contexts it is judged on
    "seq_kd_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: {{lmbda: 0.5, "
                                      f"source: teacher, prompt_tokens: 32, temperature: 1.0}}}}, {EVAL_24}]", TRAIN),
    "seq_kd_greedy_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: {{lmbda: 0.5, "
                                             f"source: teacher, prompt_tokens: 32, temperature: 0.0}}}}, {EVAL_24}]",
                          TRAIN),
    # interleaved sampling (SKD, Xu et al. 2024): the student proposes each token, the teacher keeps it
    # when it ranks it among its top k, else puts its own token there: the student's own states, kept
    # near text the teacher would write. SKD's setting (k 25, sampled), and greedy with k 5: a greedy
    # draft's states, corrected before they leave the teacher's few best continuations
    "skd_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: {{lmbda: 0.5, "
                                   f"source: interleaved, accept_top_k: 25, prompt_tokens: 32, temperature: 1.0}}}}, "
                                   f"{EVAL_24}]", TRAIN),
    "skd_greedy_24l": ("{init: teacher}", f"[{PRUNE_24}, {{kind: distill, loss: forward_kl, on_policy: {{lmbda: 0.5, "
                                          f"source: interleaved, accept_top_k: 5, prompt_tokens: 32, "
                                          f"temperature: 0.0}}}}, {EVAL_24}]", TRAIN),
    "seq_kd": (STUDENT, f"[{{kind: distill, loss: forward_kl, on_policy: {{lmbda: 0.5, source: teacher, "
                        f"prompt_tokens: 32, temperature: 1.0}}}}, {EVAL}]", TRAIN),
}
METRICS = {"ppl_ratio": ("ppl_ratio", "lower"), "kl": ("kl", "lower"), "top1_agreement": ("top1_agreement", "higher")}


def speculative(result: dict) -> dict:
    """The run's check at k = K: the full re-check of its export where there is one (``recheck``)."""
    spec = next(r for r in (result.get("recheck") or result["eval"])["speculative"] if r["k"] == K)
    assert spec.get("exact_match") is not False, "speculative output differs from the teacher's: a decoding bug"
    return spec


def acceptance(result: dict) -> float:
    return speculative(result)["acceptance_rate"]


def recheck(results: dict, plans: dict) -> None:
    """Every 24-layer run whose in-run check stopped at the time budget before all PROMPTS_24 prompts
    is checked again on its export with no budget (launch/evaluate.py, kept in <run>/eval_spec_all/),
    so all arms are judged on the same prompts; the result goes to ``result["recheck"]``."""
    env = dict(os.environ, **BENCH_ENV)
    options = ["--tasks", "", "--eval-blocks", "1", "--k", str(K), "--prompts", str(PROMPTS_24), "--max-new-tokens",
               str(NEW_TOKENS), "--time-budget", "0", "--no-hf-compare"]

    def served_all(saved):
        return speculative({"eval": saved})["n_prompts"] == PROMPTS_24

    for (a, s), (out, _, recipe) in plans.items():
        if a.endswith("_24l") and s in results[a] and "recheck" not in results[a][s] \
                and not served_all(results[a][s]["eval"]):
            saved = evaluate_export(REPO / out, recipe, "eval_spec_all", options, env, served_all)
            if not served_all(saved):
                sys.exit(f"error: the re-check of {out} served {speculative({'eval': saved})['n_prompts']} of "
                         f"{PROMPTS_24} prompts with no time budget (a hopeless draft?); see {out}/eval_spec_all")
            results[a][s]["recheck"] = {"speculative": saved["speculative"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(ap, ["ce", "kd", "on_policy"], list(ARMS), "runs/bench_on_policy", "on_policy")
    ap.add_argument("--baseline", help="an earlier results JSON of this script whose arms the verdicts also "
                                       "compare against (e.g. benchmarks/results/on_policy.json)")
    args = ap.parse_args()
    results, plans, wall = run_sweep(ARMS, DEFAULT_RECIPE, args)
    recheck(results, plans)
    stats = arm_stats(results, METRICS)
    for a, by_seed in results.items():
        if by_seed:
            stats[a]["acceptance"] = mean_std([acceptance(r) for r in by_seed.values()])
            stats[a]["seconds"] = mean_std([r["seconds"] for r in by_seed.values() if r.get("seconds")] or [0.0])
            # prompts served: the check's time budget can stop it before all of them
            stats[a]["prompts"] = mean_std([speculative(r)["n_prompts"] for r in by_seed.values()])
    earlier = {}
    if args.baseline:  # arms measured by an earlier sweep of this script (same recipe, seeds and budget)
        import json

        earlier = {a: st for a, st in json.loads(Path(args.baseline).read_text())["summary"].items() if a not in stats}
    verdict = {}
    for mine, rivals in RIVALS.items():
        for other in rivals:
            theirs = stats.get(other) or earlier.get(other)
            if mine in stats and theirs is not None:
                tag = "" if other in stats else f" (from {args.baseline})"
                verdict[f"{mine} accepts more drafts (k={K}) than {other}{tag}"] = \
                    f"{compare(stats[mine]['acceptance'], theirs['acceptance'], 'higher')} " \
                    f"({stats[mine]['acceptance']['mean']:.3f} vs {theirs['acceptance']['mean']:.3f})"
    for a in stats:
        ce = "ce_24l" if a.endswith("_24l") else "ce"
        if a != ce and ce in stats:
            verdict[f"{a} vs {ce}, ppl ratio"] = compare(stats[a]["ppl_ratio"], stats[ce]["ppl_ratio"], "lower")
    notes = (f"60 steps x 4 x 128 tokens per run. Mean ± sample std over seeds. acceptance: drafted tokens the "
             f"teacher kept at k = {K}, greedy, on up to {PROMPTS} held-out prompts of {PROMPT_TOKENS} tokens, "
             f"{NEW_TOKENS} new tokens each: as many as the in-run check's {BUDGET_S:.0f} s allow (prompts "
             f"served). The 24-layer arms: on all {PROMPTS_24} prompts, the same for every arm (a run whose check "
             f"stopped at the budget is checked again on its export with none: launch/evaluate.py, "
             f"<run>/eval_spec_all/).")
    columns = {"acceptance (k=4)": "acceptance_pm", "prompts served": "prompts_pm", "s/run": "seconds_pm"}
    from benchmarks.common import pm

    for st in stats.values():
        st["acceptance_pm"], st["seconds_pm"] = pm(st["acceptance"], ".3f"), pm(st["seconds"], ".0f")
        st["prompts_pm"] = pm(st["prompts"], ".0f")
    teacher = {"arm": "teacher", "ppl_ratio": "1", "kl": "0", "top1_agreement": "1"}
    shown = {**{f"{a} (earlier sweep)": st for a, st in earlier.items()}, **stats}
    students = sorted({"24-layer (pruned by calibration KL)" if a.endswith("_24l") else "16-layer (drop_layers)"
                       for a in stats})
    md = arms_markdown(f"On-policy KD (GKD) vs KD vs CE, SmolLM2-135M-Instruct → {' and '.join(students)} student, "
                       "held-out Python docs",
                       "on_policy.py", args, shown, METRICS, verdict, wall, results, notes, columns, teacher)
    if earlier:
        md += f"\nRows marked (earlier sweep) come from {args.baseline}: same recipe, seeds and budget, run before.\n"
    write_results(args.tag, sweep_payload(args, wall, ARMS, results, stats, verdict), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

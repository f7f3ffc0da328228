"""Dense -> MoE upcycling on the real teacher: the upcycled model (4 experts, top-2, copies with a
little noise) vs the dense model, both trained on the same tokens from the same start.

    .venv/bin/python benchmarks/upcycle.py [--arms dense,moe_copy,moe_split] [--seeds 0,1,2] [--jobs 1]

Every arm is a real run of launch/distill.py on the default recipe, the student a full copy of the
teacher, trained 150 steps x 8 x 128 tokens at lr 5e-5 with next-token CE (`finetune`: continued
training, as in Komatsuzaki et al., so the teacher is no ceiling); `moe_*` arms put an `upcycle`
stage first. Held-out perplexity (exp of the loss) of each, and total vs active parameters. Goal (issue
16): the upcycled model reaches a lower held-out loss than the dense one at equal steps and
tokens, beyond the seed spread.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import (DEFAULT_RECIPE, EQUAL_TOKENS, arm_stats, arms_markdown, compare,  # noqa: E402
                               run_sweep, sweep_arguments, sweep_payload, write_results)

RECIPE = DEFAULT_RECIPE
TRAIN = EQUAL_TOKENS
TEACHER = "{init: teacher}"
ARMS = {
    "dense": (TEACHER, "[{kind: finetune}]", TRAIN),
    "moe_copy": (TEACHER, "[{kind: upcycle, experts: 4, top_k: 2, noise: 0.01}, {kind: finetune}]", TRAIN),
    "moe_split": (TEACHER, "[{kind: upcycle, experts: 4, top_k: 2, init: split}, {kind: finetune}]", TRAIN),
}
METRICS = {"ppl": ("student_ppl", "lower"), "ppl_ratio": ("ppl_ratio", "lower"), "kl": ("kl", "lower")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(ap, list(ARMS), list(ARMS), "runs/bench_upcycle", "upcycle")
    args = ap.parse_args()
    results, _, wall = run_sweep(ARMS, RECIPE, args)
    stats = arm_stats(results, METRICS)
    for a, st in stats.items():
        info = next(iter(results[a].values()))["transform"].get("0-upcycle", {}).get("moe_params", {})
        st["total"], st["active"] = info.get("total"), info.get("active")
    verdict = {}
    for arm in ("moe_copy", "moe_split"):
        if arm in stats and "dense" in stats:
            verdict[f"{arm} reaches a lower held-out loss than dense"] = \
                f"{compare(stats[arm]['ppl'], stats['dense']['ppl'], 'lower')} (ppl {stats[arm]['ppl']['mean']:.3f} vs " \
                f"{stats['dense']['ppl']['mean']:.3f})"
    notes = "Mean ± sample std over seeds. Parameters: non-embedding, total and active per token (MoE arms)."
    teacher = {"arm": "teacher (untrained start)", "ppl_ratio": "1", "kl": "0"}
    md = arms_markdown("Upcycling SmolLM2-135M-Instruct to a 4-expert top-2 MoE vs continued dense training, held-out "
                       "Python docs", "upcycle.py", args, stats, METRICS, verdict, wall, results, notes,
                       {"total params": "total", "active params": "active"}, teacher)
    payload = sweep_payload(args, wall, ARMS, results, stats, verdict)
    write_results(args.tag, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense -> MoE upcycling on the real teacher: the upcycled model (4 experts, top-2, copies with a
little noise; `moe_split`: the MLP's channels split; `moe_top1`: top-1 routing, as many active
parameters per token as the dense model) vs the dense model, both trained on the same tokens from
the same start.

    .venv/bin/python benchmarks/upcycle.py [--arms dense,moe_copy,moe_split,moe_top1] [--seeds 0,1,2] [--jobs 1]

Results: benchmarks/results/<tag>.{md,json,png}; the figure has the loss curves side by side (training
loss without the router terms, and held-out perplexity every 30 steps), mean ± std over seeds.

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
                               read_page, run_sweep, sweep_arguments, sweep_payload, write_results)
from compress.report import pyplot, save_figure  # noqa: E402

RECIPE = DEFAULT_RECIPE
EVAL_EVERY = 30  # held-out evaluations along the way: the loss curves side by side
TRAIN = [*EQUAL_TOKENS, f"train.eval_every={EVAL_EVERY}"]
TEACHER = "{init: teacher}"
ARMS = {
    "dense": (TEACHER, "[{kind: finetune}]", TRAIN),
    "moe_copy": (TEACHER, "[{kind: upcycle, experts: 4, top_k: 2, noise: 0.01}, {kind: finetune}]", TRAIN),
    "moe_split": (TEACHER, "[{kind: upcycle, experts: 4, top_k: 2, init: split}, {kind: finetune}]", TRAIN),
    # top-1: as many active parameters per token as the dense model (capacity without compute per token)
    "moe_top1": (TEACHER, "[{kind: upcycle, experts: 4, top_k: 1, noise: 0.01}, {kind: finetune}]", TRAIN),
}
METRICS = {"ppl": ("student_ppl", "lower"), "ppl_ratio": ("ppl_ratio", "lower"), "kl": ("kl", "lower")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(ap, list(ARMS), list(ARMS), "runs/bench_upcycle", "upcycle")
    args = ap.parse_args()
    results, plans, wall = run_sweep(ARMS, RECIPE, args)
    stats = arm_stats(results, METRICS)
    for a, st in stats.items():
        info = next(iter(results[a].values()))["transform"].get("0-upcycle", {}).get("moe_params", {})
        st["total"], st["active"] = info.get("total"), info.get("active")
    verdict = {}
    for arm in (a for a in ARMS if a.startswith("moe_")):
        if arm in stats and "dense" in stats:
            verdict[f"{arm} reaches a lower held-out loss than dense"] = \
                f"{compare(stats[arm]['ppl'], stats['dense']['ppl'], 'lower')} (ppl {stats[arm]['ppl']['mean']:.3f} vs " \
                f"{stats['dense']['ppl']['mean']:.3f})"
    notes = "Mean ± sample std over seeds. Parameters: non-embedding, total and active per token (MoE arms)."
    teacher = {"arm": "teacher (untrained start)", "ppl_ratio": "1", "kl": "0"}
    md = arms_markdown("Upcycling SmolLM2-135M-Instruct to a 4-expert MoE vs continued dense training, held-out "
                       "Python docs", "upcycle.py", args, stats, METRICS, verdict, wall, results, notes,
                       {"total params": "total", "active params": "active"}, teacher)
    curves = {a: {s: paged_curve(r, a, s) if "page" in r else
                  curve(REPO / plans[a, s][0] / "metrics.jsonl", r["table"]) for s, r in by.items()}
              for a, by in results.items()}
    payload = sweep_payload(args, wall, ARMS, results, stats, verdict, curves=curves)
    write_results(args.tag, payload, md, plot=lambda path: _plot(curves, path))
    return 0


def paged_curve(result: dict, arm: str, seed: int) -> dict[str, list]:
    """A seed's curves as the results page it came from (--pages) holds them."""
    return read_page(result["page"])["curves"][arm][str(seed)]


def curve(metrics: Path, table: list[dict]) -> dict[str, list]:
    """A run's training stage as curves: held-out perplexity at its start (the summary table's row
    before the final one), every EVAL_EVERY steps (metrics.jsonl) and at its end, and the training
    loss at each log step without the router's terms (``ce`` of a finetune stage, ``kd`` of a distill one)."""
    import json

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = max(r["stage"] for r in recs if "lr" in r)  # the training stage (an upcycle stage trains none)
    train = [r for r in recs if r.get("stage") == last and "lr" in r]
    key = "ce" if "ce" in train[0] else "kd"
    final = next(i for i, row in enumerate(table) if row["model"] == "student (final)")
    pts = [(0, table[final - 1]["student_ppl"])]
    pts += [(r["step"], r["eval/student_ppl"]) for r in recs if r.get("stage") == last and "eval/student_ppl" in r]
    pts.append((max(r["step"] for r in train), table[final]["student_ppl"]))
    return {"eval_step": [x for x, _ in pts], "eval_ppl": [y for _, y in pts],
            "train_step": [r["step"] for r in train], "train_loss": [r[key] for r in train]}


def _plot(curves: dict, path: Path) -> None:
    import numpy as np

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (arm, by_seed) in enumerate(curves.items()):
        color = f"C{i}"
        for key, ax, xs_key in (("train_loss", left, "train_step"), ("eval_ppl", right, "eval_step")):
            runs = [c for c in by_seed.values() if c[key]]
            n = min((len(c[key]) for c in runs), default=0)
            if not n:
                continue
            ys = np.array([c[key][:n] for c in runs], dtype=float)
            xs, mean = runs[0][xs_key][:n], ys.mean(0)
            ax.plot(xs, mean, color=color, label=f"{arm} ({len(runs)} seeds)", marker="o" if key == "eval_ppl" else None,
                    ms=3)
            if len(runs) > 1:
                ax.fill_between(xs, mean - ys.std(0, ddof=1), mean + ys.std(0, ddof=1), color=color, alpha=0.2)
    left.set(title="training loss, router terms excluded (mean ± std)", xlabel="step")
    right.set(title="held-out perplexity", xlabel="step")
    for ax in (left, right):
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

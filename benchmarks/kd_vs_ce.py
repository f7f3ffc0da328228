"""KD vs CE-only at equal steps and tokens, from the same student init, on the real teacher, over seeds.

    .venv/bin/python benchmarks/kd_vs_ce.py [--variants ce_only,forward_kl] [--seeds 0,1,2] [--steps 60]

Each (variant, seed) is a real run of launch/distill.py (default recipe, overrides below, `seed=<s>`).
The seed drives the data order; the drop_layers student init is the same for every seed. One seed
is noise here (the same recipe on another CPU ended ~5% apart in perplexity), so each variant
reports mean ± sample std over seeds of the held-out student perplexity, top-1 agreement with the
teacher, KL, and the gap ratio (student_ppl - teacher_ppl) / (ce_only_ppl - teacher_ppl), taken per
seed against the CE-only run of the same seed. Goal: KD gap ratio at most 0.5. A claim ("KD beats
CE-only", "goal met") is made only when the difference exceeds the spread: the mean ± std
intervals do not overlap, or the whole interval lies on one side of the goal.

Runs go to runs/bench_kd_vs_ce/<tag>/<variant>/seed<s> with a log next to them; --reuse takes a
finished run whose recorded recipe equals the one it would run. Writes
benchmarks/results/<tag>.{json,md,png} (each atomically) once every run has finished.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from compress.tracking import format_table  # noqa: E402
from benchmarks.common import BENCH_ENV, compare, finished, mean_std, plan_run, pm, run_recipe, write_results  # noqa: E402
from compress.report import pyplot, save_figure  # noqa: E402

RECIPE = REPO / "recipes/smollm2_distill.yaml"
VARIANTS = {
    "ce_only": "[{kind: finetune}]",
    "forward_kl": "[{kind: distill, loss: forward_kl}]",
    "reverse_kl": "[{kind: distill, loss: reverse_kl}]",
    "jsd": "[{kind: distill, loss: jsd, beta: 0.5}]",
}
METRICS = {"ppl": ("student_ppl", "lower"), "top1_agreement": ("top1_agreement", "higher"), "kl": ("kl", "lower")}
GOAL = 0.5  # KD gap ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated recipe seeds (data order); 3 or more for a spread")
    ap.add_argument("--runs", default="runs/bench_kd_vs_ce")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, must include ce_only")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run, e.g. train.lr=1e-3")
    ap.add_argument("--tag", default="kd_vs_ce", help="name of the result files and of the run folder")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs whose recipe matches (after a failure)")
    args = ap.parse_args()

    variants = args.variants.split(",")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if unknown := [v for v in variants if v not in VARIANTS]:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "ce_only" not in variants:
        sys.exit("error: the gap ratio is taken against ce_only; add it to --variants")
    if len(set(seeds)) != len(seeds):
        sys.exit(f"error: --seeds {args.seeds} repeats a seed")
    if any(s.split("=")[0].strip() == "seed" for s in args.set):
        sys.exit("error: pass seeds with --seeds, not --set seed=...")
    if len(seeds) < 3:
        print(f"warning: {len(seeds)} seed(s): the spread is not estimated well; use 3 or more", file=sys.stderr)

    runs = [(v, s) for s in seeds for v in variants]  # seed-major: an interrupted sweep leaves complete pairs
    plans = {}
    for v, s in runs:  # validate every recipe before the first 8-minute run
        plans[v, s] = plan_run(f"{v} seed {s}", RECIPE, Path(args.runs) / args.tag / v / f"seed{s}",
                               [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
                                f"stages={VARIANTS[v]}", *args.set, f"seed={s}"])

    env = dict(os.environ, **BENCH_ENV)
    results, t_start = {v: {} for v in variants}, time.time()
    for i, (v, s) in enumerate(runs, 1):
        out, overrides, recipe = plans[v, s]
        done = finished(REPO / out, recipe) if args.reuse else None
        if done is not None:
            print(f"[{i}/{len(runs)}] {v} seed {s}: reusing {out / 'summary.json'}", flush=True)
            results[v][s] = done
            continue
        print(f"[{i}/{len(runs)}] {v} seed {s} → {out}", flush=True)
        results[v][s] = run_recipe(f"{v} seed {s}", RECIPE, out, overrides, recipe, env)
        print(f"[{i}/{len(runs)}] {v} seed {s}: {results[v][s]['final']} ({results[v][s]['seconds']:.0f} s)", flush=True)

    stats = _stats(results, seeds)
    verdict = _verdict(stats, variants)
    elapsed = time.time() - t_start
    times = [r["seconds"] for by_seed in results.values() for r in by_seed.values()]
    wall = sum(t for t in times if t is not None)  # reused runs count with their recorded time
    md = _markdown(args, results, stats, verdict, seeds, wall)
    payload = {"args": vars(args), "seeds": seeds, "wall_seconds": wall, "elapsed_seconds": elapsed, "goal": GOAL,
               "per_seed": {v: {str(s): r for s, r in results[v].items()} for v in variants},
               "summary": stats, "verdict": verdict}
    write_results(args.tag, payload, md, lambda p: _plot(results, stats, seeds, p), indent=2)
    return 0


def _stats(results: dict, seeds: list[int]) -> dict:
    """Adds gap_ratio to every per-seed result (against ce_only of the same seed); mean ± std per variant."""
    stats = {}
    for v, by_seed in results.items():
        for s, r in by_seed.items():
            t, ce = r["final"]["teacher_ppl"], results["ce_only"][s]["final"]["student_ppl"]
            r["gap_ratio"] = (r["final"]["student_ppl"] - t) / (ce - t)
        stats[v] = {m: mean_std([by_seed[s]["final"][k] for s in seeds]) for m, (k, _) in METRICS.items()}
        stats[v]["gap_ratio"] = mean_std([by_seed[s]["gap_ratio"] for s in seeds])
        secs = [by_seed[s]["seconds"] for s in seeds if by_seed[s]["seconds"] is not None]
        stats[v]["seconds"] = mean_std(secs) if secs else None
    first = results["ce_only"][seeds[0]]
    stats["teacher"] = mean_std([r["final"]["teacher_ppl"] for by_seed in results.values() for r in by_seed.values()])
    stats["student_init"] = {m: first["init"][k] for m, (k, _) in METRICS.items()}
    # the claim "same student init" checked: every run measured the same init and the same teacher
    same = lambda a, b: math.isclose(a, b, rel_tol=1e-6)  # noqa: E731
    stats["same_init_and_teacher"] = all(
        same(r["final"]["teacher_ppl"], first["final"]["teacher_ppl"])
        and all(same(r["init"][k], first["init"][k]) for k, _ in METRICS.values())
        for by_seed in results.values() for r in by_seed.values())
    return stats


def _verdict(stats: dict, variants: list[str]) -> dict:
    out = {}
    for v in variants:
        if v == "ce_only":
            continue
        g = stats[v]["gap_ratio"]
        if g["std"] is None:
            goal = "no claim (one seed: no spread)"
        elif g["mean"] + g["std"] <= GOAL:
            goal = "met"
        elif g["mean"] - g["std"] > GOAL:
            goal = "not met"
        else:
            goal = "inconclusive (the mean ± std interval straddles 0.5)"
        out[v] = {"goal_gap_ratio_le_0.5": goal,
                  **{f"vs_ce_only_{m}": compare(stats[v][m], stats["ce_only"][m], d) for m, (_, d) in METRICS.items()}}
    return out


def _markdown(args, results: dict, stats: dict, verdict: dict, seeds: list[int], wall: float) -> str:
    tokens = args.steps * args.micro_batch * 128
    n_runs = sum(len(r) for r in results.values())
    n_untimed = sum(r["seconds"] is None for by_seed in results.values() for r in by_seed.values())
    extra = ("".join(f" --set {x}" for x in args.set) + (f" --tag {args.tag}" if args.tag != "kd_vs_ce" else "")
             + (f" --runs {args.runs}" if args.runs != "runs/bench_kd_vs_ce" else ""))
    cmd = (f".venv/bin/python benchmarks/kd_vs_ce.py --variants {args.variants} --seeds {args.seeds} "
           f"--steps {args.steps} --micro-batch {args.micro_batch}{extra}")
    lines = [f"KD vs CE-only, SmolLM2-135M-Instruct → 16-layer drop-layers student, {args.steps} steps x "
             f"{args.micro_batch} x 128 tokens ({tokens:,} tokens) per run, held-out Python docs; "
             f"{len(seeds)} seeds ({args.seeds}) per variant, the seed sets the data order, same student init.",
             f"Command: {cmd}", f"Wall time: {wall / 60:.1f} min for {n_runs} runs, one after another"
             + (f" ({n_untimed} reused runs without a recorded time not counted)" if n_untimed else "") + ".", "",
             "Mean ± sample std over seeds. gap_ratio = (student_ppl - teacher_ppl) / (ce_only_ppl - teacher_ppl), "
             "per seed against the CE-only run of the same seed (CE-only is 1 by definition). Every run measured "
             + ("the same student init and teacher." if stats["same_init_and_teacher"]
                else "**not** the same student init or teacher: the runs are not comparable, see the json."), ""]
    rows = [{"model": "teacher", "ppl": pm(stats["teacher"])},
            {"model": "student before training", **{m: f"{stats['student_init'][m]:.4g}" for m in METRICS}}]
    rows += [{"model": v, "seeds": len(seeds), **{m: pm(stats[v][m]) for m in METRICS},
              "gap_ratio": pm(stats[v]["gap_ratio"], ".3f"), "seconds/run": pm(stats[v]["seconds"], ".0f")}
             for v in results]
    lines += [format_table(rows, ["model", "seeds", "ppl", "top1_agreement", "kl", "gap_ratio", "seconds/run"]), ""]
    lines += ["Verdict (a claim holds only where the difference exceeds the spread: mean ± std intervals apart):", ""]
    for v, d in verdict.items():
        g, ppl = stats[v]["gap_ratio"], d["vs_ce_only_ppl"]
        lines.append(f"- **{v}: goal (gap ratio <= {GOAL}) {d['goal_gap_ratio_le_0.5'].upper()}** "
                     f"(gap ratio {pm(g, '.3f')}).")
        plain = {"better": "YES", "worse": "NO (worse beyond the spread)", "within the spread": "NO (within the spread)"}
        lines.append(f"- **{v} better than CE-only in perplexity beyond the spread: {plain.get(ppl, ppl)}** "
                     f"({pm(stats[v]['ppl'])} vs {pm(stats['ce_only']['ppl'])}); "
                     f"top-1 agreement: {d['vs_ce_only_top1_agreement']}; KL: {d['vs_ce_only_kl']}.")
        wins = sum(results[v][s]["final"]["student_ppl"] < results["ce_only"][s]["final"]["student_ppl"] for s in seeds)
        lines.append(f"- {v} has the lower perplexity than CE-only in {wins} of {len(seeds)} seeds (paired by seed).")
    per_seed = [{"variant": v, "seed": s, "ppl": r["final"]["student_ppl"], "top1_agreement": r["final"]["top1_agreement"],
                 "kl": r["final"]["kl"], "gap_ratio": r["gap_ratio"],
                 "seconds": "reused" if r["seconds"] is None else round(r["seconds"])}
                for v in results for s, r in results[v].items()]
    cols = ["variant", "seed", "ppl", "top1_agreement", "kl", "gap_ratio", "seconds"]
    lines += ["", "Per seed:", "", format_table(per_seed, cols)]
    return "\n".join(lines) + "\n"


def _plot(results: dict, stats: dict, seeds: list[int], path: Path) -> None:
    plt = pyplot()

    panels = [("ppl", "held-out perplexity (lower better)"), ("gap_ratio", "gap ratio vs CE-only (lower better)"),
              ("top1_agreement", "top-1 agreement (higher better)"), ("kl", "KL to teacher (lower better)")]
    names = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (m, title) in zip(axes, panels):
        for i, v in enumerate(names):
            ys = [results[v][s]["gap_ratio"] if m == "gap_ratio" else results[v][s]["final"][METRICS[m][0]] for s in seeds]
            xs = [i - 0.12 + 0.24 * j / max(len(seeds) - 1, 1) for j in range(len(seeds))]
            ax.scatter(xs, ys, s=14, color="#3b7dd8", alpha=0.7, zorder=3, label="per seed" if i == 0 else None)
            st = stats[v][m]
            ax.errorbar([i + 0.3], [st["mean"]], yerr=[st["std"] or 0], fmt="o", color="#222", capsize=4, zorder=4,
                        label="mean ± std" if i == 0 else None)
        if m == "ppl":
            ax.axhline(stats["teacher"]["mean"], ls="--", color="#888", lw=1, label="teacher")
        if m == "gap_ratio":
            ax.axhline(GOAL, ls="--", color="#c33", lw=1, label=f"goal {GOAL}")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"KD vs CE-only over seeds {','.join(map(str, seeds))}", fontsize=10)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

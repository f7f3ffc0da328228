"""Structured pruning + KD on the real teacher, at ~50% of the non-embedding parameters, over seeds.

    .venv/bin/python benchmarks/prune_kd.py [--arms width_kd,width_random_kd,...] [--seeds 0,1,2] [--jobs 1]

Every arm is a real run of launch/distill.py: the default recipe (recipes/smollm2_distill.yaml:
80 steps x 8 x 128 tokens, lr 1e-3) with the arm's student and stages, `seed=<s>`. Equal training
tokens in every arm. The seed drives the data order and the calibration draw.

Arms (ARMS below):
  drop_layers       the current default: every other layer kept (16 of 30, 53% of the parameters) + KD
  depth_kd          prune 30 -> 15 layers by importance (KL when a block is skipped) + KD
  width_kd          prune the width by importance (hidden 576 -> 432, MLP 1536 -> 848; 49.9%) + KD
  width_random_kd   the same shape with structures chosen at random + KD
  random_init_kd    the same shape, randomly initialized + KD
  width_ce          width_kd's pruned model trained with next-token CE only (the KD-vs-CE goal)
  budget_kd         target_params: 0.5, shape by search (calibration KL) + KD
  width_kd_ce       width_kd with next-token CE added to the KD loss (ce_weight 1)
  width_lora_kd     width_kd training LoRA adapters only (r 16 on every projection), merged before export
"Pruned without training" rows come from each prune arm's transform.json. Reported per arm: held-out
perplexity and its ratio to the teacher, top-1 agreement, KL, parameters, bytes on disk, and the
CPU forward latency of the exported model as a ratio to the teacher's (measured in the same process,
batch 1 x 128 tokens). Claims are made only beyond the seed spread (mean ± std intervals apart).

Runs go to <runs>/<arm>/seed<s>; --reuse takes finished runs whose recipe matches. --aggregate only
collects what has finished (e.g. after a timeout) and writes benchmarks/results/<tag>.{json,md,png}.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import (compare, latency_ratios, mean_std, pm, run_folder, run_sweep, sweep_arguments,  # noqa: E402
                               write_results)
from compress.report import pyplot, save_figure  # noqa: E402
from compress.tracking import format_table  # noqa: E402

RECIPE = REPO / "recipes/smollm2_distill.yaml"
WIDTH = "{kind: prune, hidden_size: 432, intermediate_size: 848}"
ARMS = {
    "drop_layers": ("{init: drop_layers, keep_every: 2}", "[{kind: distill}]"),
    "depth_kd": ("{init: teacher}", "[{kind: prune, num_hidden_layers: 15}, {kind: distill}]"),
    "width_kd": ("{init: teacher}", f"[{WIDTH}, {{kind: distill}}]"),
    "width_random_kd": ("{init: teacher}", "[{kind: prune, hidden_size: 432, intermediate_size: 848, importance: random}, "
                                           "{kind: distill}]"),
    "random_init_kd": ("{init: config, config: {hidden_size: 432, intermediate_size: 848, head_dim: 64}}",
                       "[{kind: distill}]"),
    "width_ce": ("{init: teacher}", f"[{WIDTH}, {{kind: finetune}}]"),
    "budget_kd": ("{init: teacher}", "[{kind: prune, target_params: 0.5}, {kind: distill}]"),
    "width_kd_ce": ("{init: teacher}", f"[{WIDTH}, {{kind: distill, ce_weight: 1.0}}]"),
    "width_lora_kd": ("{init: teacher}", f"[{WIDTH}, {{kind: distill, lora: {{r: 16, alpha: 32}}}}]"),
}
METRICS = {"ppl": ("student_ppl", "lower"), "ppl_ratio": ("ppl_ratio", "lower"),
           "top1_agreement": ("top1_agreement", "higher"), "kl": ("kl", "lower")}
GOAL = 0.5  # KD gap ratio against CE on the same pruned student


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(ap, list(ARMS)[:7], list(ARMS), "runs/bench_prune_kd", "prune_kd")
    args = ap.parse_args()

    results, plans, wall = run_sweep(ARMS, RECIPE, args)
    arms = args.arms.split(",")
    folders = {a: run_folder(results, plans, a) for a in arms if results[a]}
    latency = latency_ratios({a: f / "final" for a, f in folders.items() if f is not None}, RECIPE)
    stats = _stats(results, latency)
    verdict = _verdict(stats)
    md = _markdown(args, results, stats, verdict, wall)
    payload = {"args": vars(args), "wall_seconds": wall, "arms": {a: ARMS[a] for a in arms},
               "per_seed": {a: {str(s): r for s, r in results[a].items()} for a in arms},
               "latency": latency, "summary": stats, "verdict": verdict}
    write_results(args.tag, payload, md, lambda p: _plot(results, stats, p))
    return 0


def _stats(results: dict, latency: dict) -> dict:
    stats = {}
    for a, by_seed in results.items():
        if not by_seed:
            continue
        rs = list(by_seed.values())
        st = {m: mean_std([r["final"][k] for r in rs]) for m, (k, _) in METRICS.items()}
        first = rs[0]
        st.update(seeds=sorted(by_seed), params=first["student_params"], bytes_on_disk=first["bytes_on_disk"],
                  latency_ratio=latency.get(a), seconds=mean_std([r["seconds"] for r in rs if r.get("seconds")] or [0]))
        pruned = [t["metrics"] for r in rs for t in r["transform"].values() if "metrics" in t]
        if pruned:
            st["pruned_only"] = {m: mean_std([p[k] for p in pruned]) for m, (k, _) in METRICS.items()}
            shapes = [t["shape"] for t in first["transform"].values()]
            st["shape"] = shapes[-1]
            st["non_embedding_fraction"] = list(first["transform"].values())[-1]["non_embedding_params"]["fraction"]
        stats[a] = st
    if "width_kd" in results and "width_ce" in results:
        common = sorted(set(results["width_kd"]) & set(results["width_ce"]))
        gaps = []
        for s in common:
            t = results["width_kd"][s]["final"]["teacher_ppl"]
            gaps.append((results["width_kd"][s]["final"]["student_ppl"] - t)
                        / (results["width_ce"][s]["final"]["student_ppl"] - t))
        if gaps:
            stats["kd_gap_ratio"] = mean_std(gaps)
    teacher = [r["final"]["teacher_ppl"] for by in results.values() for r in by.values()]
    stats["teacher_ppl"] = mean_std(teacher) if teacher else None
    return stats


def _verdict(stats: dict) -> dict:
    v = {}

    def claim(name, a, b, metric="ppl"):
        if a in stats and b in stats:
            v[name] = f"{compare(stats[a][metric], stats[b][metric], METRICS[metric][1])} ({metric} " \
                      f"{pm(stats[a][metric])} vs {pm(stats[b][metric])})"

    claim("importance beats random choice (width_kd vs width_random_kd)", "width_kd", "width_random_kd")
    claim("pruned + KD beats random init + KD (width_kd vs random_init_kd)", "width_kd", "random_init_kd")
    if "width_kd" in stats and "pruned_only" in stats["width_kd"]:
        v["pruned + KD beats pruned only (width_kd)"] = (
            f"{compare(stats['width_kd']['ppl'], stats['width_kd']['pruned_only']['ppl'], 'lower')} "
            f"(ppl {pm(stats['width_kd']['ppl'])} vs {pm(stats['width_kd']['pruned_only']['ppl'])})")
    claim("width beats depth at the same parameter count (width_kd vs depth_kd)", "width_kd", "depth_kd")
    pruned = [a for a in ("width_kd", "depth_kd", "budget_kd") if a in stats]
    if pruned:
        best = min(pruned, key=lambda a: stats[a]["ppl"]["mean"])
        claim(f"the best pruned student ({best}) beats the drop_layers default", best, "drop_layers")
    claim("KD beats CE on the pruned student (width_kd vs width_ce)", "width_kd", "width_ce")
    claim("KD + CE beats CE on the pruned student (width_kd_ce vs width_ce)", "width_kd_ce", "width_ce")
    claim("KD + CE vs KD alone in agreement (width_kd_ce vs width_kd)", "width_kd_ce", "width_kd", "top1_agreement")
    claim("full-weight KD beats LoRA KD at equal steps (width_kd vs width_lora_kd)", "width_kd", "width_lora_kd")
    if "kd_gap_ratio" in stats:
        g = stats["kd_gap_ratio"]
        goal = ("no claim (one seed)" if g["std"] is None else "met" if g["mean"] + g["std"] <= GOAL
                else "not met" if g["mean"] - g["std"] > GOAL else "inconclusive (interval straddles 0.5)")
        v[f"KD gap ratio <= {GOAL} (width_kd vs width_ce, per seed)"] = f"{goal} ({pm(g, '.3f')})"
    return v


def _markdown(args, results: dict, stats: dict, verdict: dict, wall: float) -> str:
    extra = "".join(f" --set {x}" for x in args.set)
    lines = [f"Structured pruning + KD, SmolLM2-135M-Instruct at ~50% of the non-embedding parameters; default recipe "
             f"(80 steps x 8 x 128 tokens, held-out Python docs) in every arm; seeds {args.seeds}.",
             f"Command: .venv/bin/python benchmarks/prune_kd.py --arms {args.arms} --seeds {args.seeds} "
             f"--jobs {args.jobs}{extra}", f"Wall time: {wall / 60:.1f} min ({args.jobs} at once).",
             "Device: " + ", ".join(sorted({f"{r.get('device')} ({r.get('precision')})" for by in results.values()
                                           for r in by.values()})), "",
             f"Teacher perplexity: {pm(stats.get('teacher_ppl'))}. Mean ± sample std over seeds; latency = CPU forward "
             "time (batch 1 x 128 tokens, fp32) / the teacher's, same process.", ""]
    rows = []
    for a, st in stats.items():
        if not isinstance(st, dict) or "ppl" not in st:
            continue
        row = {"arm": a, "seeds": len(st["seeds"]), "params": st["params"], "bytes": st["bytes_on_disk"],
               **{m: pm(st[m]) for m in METRICS}, "latency": f"{st['latency_ratio']:.2f}" if st["latency_ratio"] else ""}
        rows.append(row)
        if "pruned_only" in st:
            rows.append({"arm": f"{a} (pruned, no training)", "seeds": len(st["seeds"]),
                         **{m: pm(st["pruned_only"][m]) for m in METRICS}})
    lines += [format_table(rows, ["arm", "seeds", "params", "bytes", *METRICS, "latency"]), ""]
    shapes = [{"arm": a, **st["shape"], "fraction": f"{st['non_embedding_fraction']:.3f}"}
              for a, st in stats.items() if isinstance(st, dict) and "shape" in st]
    if shapes:
        lines += ["Pruned shapes (fraction = non-embedding parameters kept):", "",
                  format_table(shapes, list(dict.fromkeys(k for r in shapes for k in r))), ""]
    lines += ["Verdicts (beyond the spread = mean ± std intervals apart):", ""]
    lines += [f"- **{k}**: {val}" for k, val in verdict.items()]
    per_seed = [{"arm": a, "seed": s, "ppl": r["final"]["student_ppl"], "top1_agreement": r["final"]["top1_agreement"],
                 "kl": r["final"]["kl"], "seconds": round(r["seconds"]) if r.get("seconds") else "reused"}
                for a in results for s, r in sorted(results[a].items())]
    lines += ["", "Per seed:", "", format_table(per_seed, ["arm", "seed", "ppl", "top1_agreement", "kl", "seconds"])]
    return "\n".join(lines) + "\n"


def _plot(results: dict, stats: dict, path: Path) -> None:
    plt = pyplot()

    arms = [a for a in results if results[a]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (m, title) in zip(axes, [("ppl_ratio", "perplexity / teacher's (lower better)"),
                                     ("top1_agreement", "top-1 agreement (higher better)"),
                                     ("kl", "KL to teacher (lower better)")]):
        for i, a in enumerate(arms):
            ys = [r["final"][METRICS[m][0]] for r in results[a].values()]
            ax.scatter([i - 0.1] * len(ys), ys, s=14, color="#3b7dd8", alpha=0.7, zorder=3)
            st = stats[a][m]
            ax.errorbar([i + 0.15], [st["mean"]], yerr=[st["std"] or 0], fmt="o", color="#222", capsize=4, zorder=4)
            if "pruned_only" in stats[a]:
                ax.scatter([i + 0.3], [stats[a]["pruned_only"][m]["mean"]], marker="x", color="#c33", zorder=4,
                           label="pruned, no training" if i == 0 or "pruned_only" not in stats[arms[0]] else None)
        if m != "top1_agreement":
            ax.set_yscale("log")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles[:1], labels[:1], fontsize=7)
    fig.suptitle("Structured pruning + KD at ~50% of the non-embedding parameters (dots: seeds; bars: mean ± std)",
                 fontsize=10)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""KD vs CE-only at equal steps and tokens, from the same student init, on the real teacher.

    .venv/bin/python benchmarks/kd_vs_ce.py [--steps 60] [--micro-batch 4]

Each variant is a real run of launch/distill.py (default recipe, overrides below). Reports the
held-out perplexity of the teacher, the student before training, CE-only and each KD loss,
and the gap ratio (student_ppl - teacher_ppl) / (ce_only_ppl - teacher_ppl): our goal is
KD at most 0.5. Writes benchmarks/results/kd_vs_ce.{json,md,png}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from compress.tracking import format_table  # noqa: E402

VARIANTS = {
    "ce_only": "[{kind: finetune}]",
    "forward_kl": "[{kind: distill, loss: forward_kl}]",
    "reverse_kl": "[{kind: distill, loss: reverse_kl}]",
    "jsd": "[{kind: distill, loss: jsd, beta: 0.5}]",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--runs", default="runs/bench_kd_vs_ce")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every variant, e.g. train.lr=1e-3")
    ap.add_argument("--tag", default="kd_vs_ce", help="name of the result files")
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true")
    results = {}
    for name in args.variants.split(","):
        out = Path(args.runs) / args.tag / name
        cmd = [sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(REPO / "recipes/smollm2_distill.yaml"),
               f"output_dir={out}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
               "train.save_every=1000", "wandb.mode=disabled", f"stages={VARIANTS[name]}", *args.set, "--fresh"]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        summary = json.loads((out / "summary.json").read_text())
        results[name] = {"init": summary["metrics"]["init"], "final": summary["metrics"]["final"],
                         "seconds": time.time() - t0}
        print(f"{name}: {results[name]['final']}", flush=True)

    teacher_ppl = next(iter(results.values()))["final"]["teacher_ppl"]
    ce_ppl = results["ce_only"]["final"]["student_ppl"] if "ce_only" in results else None
    rows = [{"model": "teacher", "ppl": teacher_ppl},
            {"model": "student before training", **_cols(next(iter(results.values()))["init"])}]
    for name, r in results.items():
        gap = (r["final"]["student_ppl"] - teacher_ppl) / (ce_ppl - teacher_ppl) if ce_ppl else None
        rows.append({"model": name, **_cols(r["final"]), "gap_vs_ce": gap, "seconds": r["seconds"]})
    tokens = args.steps * args.micro_batch * 128
    table = format_table(rows, ["model", "ppl", "ppl_ratio", "top1_agreement", "kl", "gap_vs_ce", "seconds"])
    extra = "".join(f" --set {x}" for x in args.set) + (f" --tag {args.tag}" if args.tag != "kd_vs_ce" else "")
    header = (f"KD vs CE-only, SmolLM2-135M-Instruct → 16-layer drop-layers student, {args.steps} steps x "
              f"{args.micro_batch} x 128 tokens ({tokens:,} tokens), held-out Python docs.\n"
              f"Command: .venv/bin/python benchmarks/kd_vs_ce.py --steps {args.steps} --micro-batch {args.micro_batch}{extra}\n")
    print("\n" + header + "\n" + table)
    res = REPO / "benchmarks/results"
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{args.tag}.json").write_text(json.dumps({"args": vars(args), "results": results, "rows": rows}, indent=2))
    (res / f"{args.tag}.md").write_text(header + "\n" + table + "\n")
    _plot(rows, res / f"{args.tag}.png")


def _cols(m: dict) -> dict:
    return {"ppl": m["student_ppl"], "ppl_ratio": m.get("ppl_ratio"), "top1_agreement": m.get("top1_agreement"),
            "kl": m.get("kl")}


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    ax.barh(names, [r["ppl"] for r in rows], color=["#444"] + ["#bbb"] + ["#3b7dd8"] * (len(rows) - 2))
    ax.set_xlabel("held-out perplexity (lower is better)")
    ax.set_xscale("log")
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r["ppl"], i, f" {r['ppl']:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

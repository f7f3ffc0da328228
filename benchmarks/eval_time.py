"""Wall time of the default evaluation (`launch/evaluate.py` with its defaults) per student.

    .venv/bin/python benchmarks/eval_time.py --label "after, cold teacher cache" --model runs/smollm2-distill/final [--cold]
    .venv/bin/python benchmarks/eval_time.py --label "before (826bfe1)" --repo /tmp/old --model ...

Each call runs one evaluation in its own process (``--repo`` picks the checkout whose
launch/evaluate.py runs, so an older commit can be timed on the same machine), and appends a row
to benchmarks/results/eval_time.{json,md}: the label, the model, wall seconds, the time per phase
(when the evaluation reports it) and the speculative rows' acceptance and early stops.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks/results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--repo", default=str(REPO), help="checkout whose launch/evaluate.py runs")
    ap.add_argument("--cold", action="store_true", help="clear the teacher's cached lm-eval scores first")
    ap.add_argument("extra", nargs="*", help="more arguments for launch/evaluate.py")
    args = ap.parse_args()
    if args.cold:
        shutil.rmtree(REPO / ".cache/eval", ignore_errors=True)
    out = Path(f"/tmp/eval_time-{os.getpid()}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(args.repo) / "launch/evaluate.py"), "--model", str(Path(args.model).resolve()),
           "--out", str(out), *args.extra]
    start = time.time()
    p = subprocess.run(cmd, cwd=args.repo, env=env)
    wall = time.time() - start
    if p.returncode not in (0, 3):
        sys.exit(f"error: evaluation failed with exit status {p.returncode}: {' '.join(cmd)}")
    res = json.loads((out / "eval.json").read_text())
    row = {"label": args.label, "model": args.model, "wall_s": round(wall, 1), "phases": res.get("seconds"),
           "tasks": res["tasks"],
           "speculative": [{k: r.get(k) for k in ("k", "n_prompts", "acceptance_rate", "speedup", "exact_match", "stopped")}
                           for r in res["speculative"]]}
    path = OUT / "eval_time.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=2))
    lines = ["Wall time of the default evaluation (`python launch/evaluate.py --model M`), 2 CPU cores, one process alone.",
             "Command per row: `.venv/bin/python benchmarks/eval_time.py --label L --model M [--cold] [--repo R]`.", "",
             "| label | model | wall (min) | phases (s) | speculative: k / prompts run / acceptance / stopped |",
             "|---|---|---|---|---|"]
    for r in rows:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in (r["phases"] or {}).items()) or "(not reported)"
        spec = "; ".join(f"{s['k']} / {s['n_prompts']} / "
                         f"{'' if s['acceptance_rate'] is None else format(s['acceptance_rate'], '.3f')} / {s['stopped'] or ''}"
                         for s in r["speculative"])
        lines.append(f"| {r['label']} | {r['model']} | {r['wall_s'] / 60:.1f} | {phases} | {spec} |")
    (OUT / "eval_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

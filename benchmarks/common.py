"""What the benchmark scripts share: running a recipe as a real launch/distill.py run (reusable
after a failure), mean ± std over seeds, claims only beyond the spread, atomic result files."""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true")


def plan_run(label: str, recipe_path: Path, out: Path, overrides: list[str]) -> tuple[Path, list[str], dict]:
    """(out, overrides, resolved recipe) for one run, validated now: a bad sweep fails before any run."""
    from compress.errors import CompressError
    from compress.recipe import load_recipe

    overrides = [f"output_dir={out}", "train.save_every=1000", "wandb.mode=disabled", *overrides]
    try:
        recipe = json.loads(json.dumps(load_recipe(recipe_path, overrides).model_dump(mode="json")))
    except CompressError as e:
        sys.exit(f"error: {label}: {e}")
    return out, overrides, recipe


def finished(out: Path, recipe: dict) -> dict | None:
    """A finished run in ``out`` made from exactly ``recipe`` (with its time if recorded), or None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("recipe") != recipe:
        return None
    try:
        seconds = json.loads(out.with_suffix(".time.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        seconds = None
    return {"init": summary["metrics"]["init"], "final": summary["metrics"]["final"], "seconds": seconds, "reused": True}


def run_recipe(label: str, recipe_path: Path, out: Path, overrides: list[str], recipe: dict, env: dict,
               echo: bool = True) -> dict:
    """One launch/distill.py run, its output streamed to the console and to a log; exits on failure."""
    log = REPO / out.parent / f"{out.name}.log"  # out is relative to the repo, where the run starts
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "launch/distill.py"), "--recipe", str(recipe_path), *overrides, "--fresh"]
    t0 = time.time()
    with open(log, "wb") as f:
        f.write((shlex.join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := proc.stdout.read1(4096):
            f.write(chunk)
            f.flush()
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = proc.wait()
    seconds = time.time() - t0
    summary = finished(REPO / out, recipe)
    if rc != 0 or summary is None:
        tail = "\n".join(log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:])
        why = f"exit status {rc}" if rc != 0 else f"exit status 0 but no summary.json for this recipe in {out}"
        sys.exit(f"\n{tail}\n\nerror: run {label} failed ({why}) after {seconds:.0f} s.\n"
                 f"  command: {shlex.join(cmd)}\n  full log: {log}\n"
                 f"No results were written. Finished runs are kept: rerun with --reuse to skip them.")
    (REPO / out).with_suffix(".time.json").write_text(json.dumps({"seconds": seconds}))  # kept for --reuse
    return {**summary, "seconds": seconds, "reused": False}


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs),
            "min": min(xs), "max": max(xs)}


def compare(a: dict, b: dict, better: str) -> str:
    """'better' / 'worse' / 'within the spread' for a vs b, from non-overlapping mean ± std intervals."""
    if a["std"] is None or b["std"] is None:
        return "no claim (one seed: no spread)"
    lo_a, hi_a, lo_b, hi_b = a["mean"] - a["std"], a["mean"] + a["std"], b["mean"] - b["std"], b["mean"] + b["std"]
    if hi_a < lo_b:
        return "better" if better == "lower" else "worse"
    if lo_a > hi_b:
        return "worse" if better == "lower" else "better"
    return "within the spread"


def pm(ms: dict | None, fmt: str = ".4g") -> str:
    if ms is None:
        return ""
    return f"{ms['mean']:{fmt}}" + (f" ± {ms['std']:{fmt}}" if ms["std"] is not None else "")


def write_atomic(writers: dict) -> None:
    """Writes every file to a temporary name first, then renames them all: no half-written or mixed set."""
    tmps = {path: path.with_name(f".{path.name}.tmp") for path in writers}
    try:
        for path, write in writers.items():
            write(tmps[path])
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in tmps.items():
        os.replace(tmp, path)

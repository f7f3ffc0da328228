"""The spine of a run: recipe → stages → one training loop → checkpoint → export → metrics.

    summary = run(load_recipe("recipes/smollm2_distill.yaml"))

Layout of ``output_dir``:
    recipe.yaml                  the resolved recipe (a resumed run must match it)
    run.json                     the rest of the run's identity: number of ranks, wandb run id
    metrics.jsonl                one JSON record per logged step / evaluation
    stages/<i>-<kind>/transformed/          a stage's one-shot transform result (then it trains)
    stages/<i>-<kind>/checkpoints/step_N/   DeepSpeed checkpoints (COMPLETE = usable); removed
                                 once the stage's model is saved unless train.keep_optimizer_states
    stages/<i>-<kind>/model/     the stage's result (``compress.modelio``): a finished stage is skipped
    final/                       the export, with compression.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from compress.checkpoint import publish_file
from compress.errors import CompressError, GateFailure
from compress.export import bytes_on_disk, export_model
from compress.modelio import is_stage_model, load_stage_model, rebuild, save_stage_model
from compress.models import build_student, load_model, load_tokenizer, param_count, resolve_source, student_tokenizer
from compress.recipe import Recipe, dump_recipe
from compress.stages import RunContext, method_class, method_for
from compress.tracking import RunLogger, format_table

RUN_FILES = ("stages", "final", "metrics.jsonl", "recipe.yaml", "run.json", "summary.json", "init_metrics.json",
             "eval.json", "report.md", "report.html", "figures", "wandb")


STALE_LOCK_S = 600  # a JIT build of DeepSpeed's small CPU op takes about a minute


def check_build_locks(now: float | None = None) -> None:
    """DeepSpeed JIT-builds a small op on its first CPU start, under a lock file in torch's extensions
    folder; a build killed midway leaves the lock, and every later start waits on it forever,
    silently. A lock older than STALE_LOCK_S is refused in one line naming the file."""
    import time

    # torch builds in TORCH_EXTENSIONS_DIR/<op>, or else in ~/.cache/torch_extensions/<py311_cpu>/<op>
    own = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = [*(Path(own).glob("*/lock") if own else ()), *Path("~/.cache/torch_extensions").expanduser().glob("*/*/lock")]
    now = time.time() if now is None else now
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # the build that held it just finished
            continue
        if age > STALE_LOCK_S:
            raise CompressError(f"{lock} is {age / 60:.0f} min old: a killed extension build left it and DeepSpeed "
                                "would wait on it forever; delete it (if no build is running) and start again")


_held: dict = {}  # output_dir -> its open lock file, for this process's life


def hold_output_dir(out: Path) -> None:
    """One run at a time in an output_dir: an exclusive lock on ``<out>/.run.lock``, which the OS
    releases when the process ends (SIGKILL included, so a crashed run resumes). A second run in the
    same folder would mix checkpoints and exports; it is refused in one line naming the holder's pid.
    Re-entrant within a process."""
    import fcntl

    key = str(out.resolve())
    if key in _held:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise CompressError(f"{out} is in use by another run (pid {holder}); wait for it to end or give another "
                            "output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def extensions_dir() -> str | None:
    """Where DeepSpeed's JIT op is built when TORCH_EXTENSIONS_DIR is unset: inside the virtual
    environment. torch's default, ~/.cache/torch_extensions/py311_cpu, is shared by every environment
    and checkout on the machine: two venvs (or two clones' venvs) with different paths or torch builds
    rebuild the op in turn, each start taking its lock, and a start killed then leaves the lock for all
    of them. None outside a venv (a system prefix may not be writable): torch's default stays."""
    if sys.prefix == sys.base_prefix:
        return None
    return os.path.join(sys.prefix, "torch_extensions")


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; plain ``python`` gets single-process defaults."""
    if (own := extensions_dir()) is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", own)
    check_build_locks()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(verbose=False)
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return torch.distributed.get_rank(), world, device


def _has_progress(out: Path) -> bool:
    return (out / "stages").is_dir() and any((out / "stages").iterdir())


def check_resumable(out: Path, recipe: Recipe, world: int, resume: bool) -> dict:
    """The run identity (recipe, number of ranks) must match what ``out`` holds; returns run.json."""
    saved, run_file = out / "recipe.yaml", out / "run.json"
    if resume and not _has_progress(out):
        raise CompressError(f"--resume: {out} has no run to resume (no stage started); drop --resume to start it")
    if saved.exists() and saved.read_text() != dump_recipe(recipe):
        raise CompressError(f"{out} holds a run of a different recipe; use another output_dir or pass --fresh to start over")
    info = json.loads(run_file.read_text()) if run_file.exists() else {}
    if _has_progress(out) and info.get("world", world) != world:
        raise CompressError(f"{out} was run with {info['world']} rank(s) and is resumed with {world}: the global batch "
                            f"and data order depend on it; resume with {info['world']} rank(s) or pass --fresh")
    return info


def detached(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The trained student as a plain fp32 model on ``device``, usable without its engine.

    Where the optimizer kept fp32 master weights (bf16, ZeRO 1-3) those are the weights, not the
    module's bf16 copies or its empty ZeRO-3 shards: the next stage and the export start from them.
    LoRA adapters (``compress.lora``) are folded into their base weights here.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from compress.lora import lora_modules, merged_state

    lora = bool(lora_modules(module))
    if not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in module.parameters()):
        if not lora:
            return module  # fp32 without ZeRO: the optimizer stepped on these very tensors
        return rebuild(module, merged_state(module.state_dict(), module)).to(device)
    state = {}
    for name, p in module.named_parameters():
        master = safe_get_full_fp32_param(p)  # collective under ZeRO-3: every rank calls it
        if master is None:  # frozen, so not in the optimizer: gather the module's own copy
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                master = p.data.detach().clone()
        state[name] = master.reshape(getattr(p, "ds_shape", p.shape)).float().cpu()
    persistent = module.state_dict().keys()  # not e.g. rotary tables, which the skeleton rebuilds
    state.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name in persistent})
    return rebuild(module, merged_state(state, module) if lora else state).to(device)


def _file_sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def run_stage(index: int, stage, student: torch.nn.Module, ctx: RunContext) -> tuple[torch.nn.Module, dict | None]:
    """One stage: its transform (once), its training (resumable), its saved result; or a read-only
    stage's ``run``. Returns the student and what a read-only stage reported."""
    from compress.train import evaluate, train_stage

    stage_dir = ctx.output_dir / "stages" / f"{index}-{stage.kind}"
    method = method_for(stage, ctx, index, stage_dir)
    if not method.changes_model:
        return method.run(student, stage_dir), method.results
    result, info_path = stage_dir / "model", stage_dir / "transform.json"
    if is_stage_model(result):
        if ctx.is_main:
            print(f"stage {index} ({stage.kind}) already finished; loaded {result}", flush=True)
        if info_path.is_file():
            method.loaded(json.loads(info_path.read_text()))
        return load_stage_model(result, ctx.device), None
    if method.has_transform():
        transformed = stage_dir / ("transformed" if method.trains else "model")
        if not is_stage_model(transformed):
            if ctx.is_main:  # one rank transforms; every rank then loads the same saved result
                new = method.transform(student)
                _write_json(info_path, method.transform_info)  # before the model: a model never lacks its info
                save_stage_model(new, transformed)
                del new
            ctx.barrier()
        student = load_stage_model(transformed, ctx.device)
        info = json.loads(info_path.read_text())
        if "metrics" not in info:  # the transformed model before any training (every rank: ZeRO-3 teacher)
            student.eval()
            info["metrics"] = evaluate(ctx, _logits_fn(student))
            info["params"] = param_count(student)
            if ctx.is_main:
                _write_json(info_path, info)
                ctx.logger.log({"stage": index, "step": 0, **{f"transformed/{k}": v for k, v in info["metrics"].items()}})
            ctx.barrier()
        method.loaded(info)
    if method.trains:
        student = detached(train_stage(index, method, student, ctx), ctx.device)
        if ctx.is_main:
            save_stage_model(student, result)
            if not ctx.recipe.train.keep_optimizer_states:  # the result is safe: free the disk
                shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
                shutil.rmtree(stage_dir / "transformed", ignore_errors=True)
        ctx.barrier()
    return student, None


def _write_json(path: Path, data: dict) -> None:
    publish_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def stage_transforms(out: Path) -> dict[int, dict]:
    """Every stage's saved ``transform.json`` (index -> info), for the summary and the report."""
    found = {}
    for path in sorted((out / "stages").glob("*/transform.json")):
        found[int(path.parent.name.split("-", 1)[0])] = json.loads(path.read_text())
    return found


def _logits_fn(model):
    return lambda x: model(input_ids=x).logits


def run(recipe: Recipe, fresh: bool = False, resume: bool = False) -> dict:
    from compress.data import prepare_data
    from compress.teacher import Teacher
    from compress.train import evaluate, use_bf16

    out = Path(recipe.output_dir)
    rank, world, device = init_distributed()
    is_main = rank == 0
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)
    if is_main:
        hold_output_dir(out)
        if fresh:
            for name in RUN_FILES:
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        info = check_resumable(out, recipe, world, resume)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        info.update(world=world)
        info.setdefault("wandb_id", os.urandom(6).hex())  # kept for the run's life: resumes continue it
        (out / "run.json").write_text(json.dumps(info))
    barrier()
    torch.manual_seed(recipe.seed)

    s_tok = student_tokenizer(recipe)
    tokenizer = s_tok or load_tokenizer(recipe.teacher.source)
    data = prepare_data(recipe.data, tokenizer, is_main, barrier)
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    logger = RunLogger(str(out), recipe.wandb, recipe.model_dump(mode="json"), is_main, run_id=run_id)
    ctx = RunContext(recipe=recipe, output_dir=out, tokenizer=tokenizer, data=data, logger=logger,
                     device=device, rank=rank, world=world)
    if s_tok is not None and recipe.needs_teacher and s_tok.get_vocab() != (t_tok := load_tokenizer(recipe.teacher.source)).get_vocab():
        ctx.teacher_tokenizer = t_tok  # cross-tokenizer KD (check_fit made every teacher-reading stage ready for it)

    def teacher_dtype(cfg) -> torch.dtype:  # auto: bf16 on GPU, fp32 on CPU
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype, auto)

    t_dtype = teacher_dtype(recipe.teacher)
    teacher_model = load_model(recipe.teacher.source) if recipe.needs_teacher or recipe.student.init != "checkpoint" else None
    student, ctx.layer_map = build_student(recipe, teacher_model)
    if teacher_model is not None:  # also for teacher-free stages: the final table is teacher-relative
        ctx.teacher = Teacher(teacher_model, shard=recipe.teacher.shard, device=device, dtype=t_dtype,
                              micro_batch=recipe.train.micro_batch_size)
    del teacher_model
    if any(method_class(s).distills for s in recipe.stages):
        for extra in recipe.extra_teachers:
            ctx.extra_teachers.append((extra.weight, Teacher(load_model(extra.source), shard=extra.shard, device=device,
                                                             dtype=teacher_dtype(extra),
                                                             micro_batch=recipe.train.micro_batch_size)))
    student = student.to(device)

    rows = []
    if ctx.teacher is not None:
        rows.append({"model": "teacher", "params": param_count(ctx.teacher.module)})
    init_path = out / "init_metrics.json"
    if init_path.exists():
        init = json.loads(init_path.read_text())
    else:
        student.eval()
        init = evaluate(ctx, _logits_fn(student))
        if is_main:
            init_path.write_text(json.dumps(init))
    rows.append({"model": "student (init)", "params": param_count(student), **init})

    stages_run = []
    eval_results = None
    for i, stage in enumerate(recipe.stages):
        student, reported = run_stage(i, stage, student, ctx)
        eval_results = reported or eval_results
        stages_run.append({"index": i, **stage.model_dump(mode="json"), "steps": recipe.stage_steps(stage)})
    transforms = stage_transforms(out)
    for entry in stages_run:
        if entry["index"] in transforms:
            entry["transform"] = transforms[entry["index"]]
            rows.append({"model": f"after {entry['index']}-{entry['kind']}", "params": transforms[entry["index"]].get("params"),
                         **transforms[entry["index"]].get("metrics", {})})

    student.eval()
    final = evaluate(ctx, _logits_fn(student))
    src = resolve_source(recipe.teacher.source)
    summary = {
        "recipe": recipe.model_dump(mode="json"),
        "teacher": {"source": recipe.teacher.source, "path": str(src), "sha256": _file_sha256(str(src)),
                    "params": rows[0]["params"] if ctx.teacher is not None else None},
        "stages": stages_run,
        "metrics": {"init": init, "final": final},
        "eval": eval_results,
        "student_params": param_count(student),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device),
        "precision": "bf16" if use_bf16(recipe.train.precision, device) else "fp32",
        "world": world,
    }
    if is_main:
        if use_bf16(recipe.train.precision, device):  # served in the precision it was trained to run in
            student = student.to(torch.bfloat16)
        export_model(student, tokenizer, out / "final", summary)
        for i, stage in enumerate(recipe.stages):  # artifacts beside the HF folder (e.g. a GGUF file)
            method_for(stage, ctx, i, out / "stages" / f"{i}-{stage.kind}").export(student, out / "final")
        rows.append({"model": "student (final)", "params": summary["student_params"],
                     "bytes_on_disk": bytes_on_disk(out / "final"), **final})
        if "teacher_ppl" in final:
            rows[0].update(student_ppl=final["teacher_ppl"], ppl_ratio=1.0, top1_agreement=1.0, kl=0.0,
                           bytes_on_disk=rows[0]["params"] * t_dtype.itemsize)
        summary["table"] = rows
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        logger.summary({f"final/{k}": v for k, v in final.items()})
        print("\n" + format_table([{**r, "ppl": r.get("student_ppl")} for r in rows],
                                  ["model", "params", "bytes_on_disk", "ppl", "ppl_ratio", "top1_agreement", "kl"]))
        from compress.report import eval_tables, write_report
        from compress.tracking import read_metrics

        if eval_results is not None:
            (out / "eval.json").write_text(json.dumps(eval_results, indent=2, default=str))
            print("\n" + eval_tables(eval_results))
        report = write_report(out, results=eval_results, metrics=read_metrics(str(out)), summary=summary, logger=logger)
        print(f"\nexported to {out / 'final'}; report: {report}", flush=True)
    logger.finish()
    barrier()
    if eval_results is not None and not eval_results["passed"]:
        raise GateFailure("quality gates failed: " + "; ".join(eval_results["failures"])
                          + "; the export is kept, loosen the gate or improve the student")
    return summary

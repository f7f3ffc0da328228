"""The spine of a run: recipe → stages → one training loop → checkpoint → export → metrics.

    summary = run(load_recipe("recipes/smollm2_distill.yaml"))

Layout of ``output_dir``:
    recipe.yaml                  the resolved recipe (a resumed run must match it)
    metrics.jsonl                one JSON record per logged step / evaluation
    stages/<i>-<kind>/checkpoints/step_N/   DeepSpeed checkpoints (COMPLETE = usable)
    stages/<i>-<kind>/model/     the stage's result (HF folder): a finished stage is skipped
    final/                       the export, with compression.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from compress.errors import CompressError, GateFailure
from compress.export import bytes_on_disk, export_model
from compress.models import build_student, load_model, load_tokenizer, param_count, resolve_source
from compress.recipe import EvalStage, Recipe, dump_recipe
from compress.stages import RunContext, method_for
from compress.tracking import RunLogger, format_table
import compress.distill  # noqa: F401  (registers the distill stage)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; plain ``python`` gets single-process defaults."""
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


def _check_resumable(out: Path, recipe: Recipe) -> None:
    saved = out / "recipe.yaml"
    if saved.exists() and saved.read_text() != dump_recipe(recipe):
        raise CompressError(f"{out} holds a run of a different recipe; use another output_dir or pass --fresh to start over")


def _detached(module: torch.nn.Module, zero3: bool) -> torch.nn.Module:
    """A plain (unpartitioned) copy of a trained student, usable without its engine."""
    if not zero3:
        return module
    import deepspeed

    state = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            state[name] = p.data.detach().clone()
    fresh = type(module)(module.config).to(next(iter(state.values())).dtype)
    fresh.load_state_dict(state, strict=False)  # tied weights appear once in named_parameters
    fresh.tie_weights()
    fresh.hf_quantizer = None
    return fresh


def _file_sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _eval_stage(index: int, stage: EvalStage, student, ctx) -> dict | None:
    """Evaluate the current student on rank 0 (lm-eval and decoding run there); cached on disk."""
    from eval.runner import evaluate_pair

    path = ctx.output_dir / "stages" / f"{index}-eval" / "eval.json"
    results = json.loads(path.read_text()) if path.exists() else None
    if results is None and ctx.is_main:
        teacher = ctx.teacher.module
        if ctx.recipe.teacher.shard != "none":  # a ZeRO-3 engine: evaluate an unsharded copy
            teacher = load_model(ctx.recipe.teacher.source).to(ctx.device).eval()
        results = evaluate_pair(student, teacher, ctx.tokenizer, stage, ctx.data.val, device=ctx.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)
        ctx.logger.log({"stage": index, "step": 0, **{f"eval/{g['gate']}": g["value"] for g in results["gates"]}})
    ctx.barrier()
    return results


def _logits_fn(model):
    return lambda x: model(input_ids=x).logits


def run(recipe: Recipe, fresh: bool = False) -> dict:
    from compress.data import prepare_data
    from compress.teacher import Teacher
    from compress.train import evaluate, train_stage

    out = Path(recipe.output_dir)
    rank, world, device = init_distributed()
    is_main = rank == 0
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)
    if is_main:
        if fresh:
            for name in ("stages", "final", "metrics.jsonl", "recipe.yaml", "summary.json", "init_metrics.json",
                         "eval.json", "report.md", "report.html", "figures"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        _check_resumable(out, recipe)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    barrier()
    torch.manual_seed(recipe.seed)

    tokenizer = load_tokenizer(recipe.teacher.source if recipe.student.init != "checkpoint" else recipe.student.path)
    data = prepare_data(recipe.data, tokenizer, is_main, barrier)
    logger = RunLogger(str(out), recipe.wandb, recipe.model_dump(mode="json"), is_main)
    ctx = RunContext(recipe=recipe, output_dir=out, tokenizer=tokenizer, data=data, logger=logger,
                     device=device, rank=rank, world=world)

    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(recipe.teacher.dtype, auto)
    teacher_model = load_model(recipe.teacher.source) if recipe.needs_teacher or recipe.student.init != "checkpoint" else None
    student, ctx.layer_map = build_student(recipe, teacher_model)
    if teacher_model is not None:  # also for teacher-free stages: the final table is teacher-relative
        ctx.teacher = Teacher(teacher_model, shard=recipe.teacher.shard, device=device, dtype=t_dtype,
                              micro_batch=recipe.train.micro_batch_size)
    del teacher_model
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
    zero3 = recipe.train.zero_stage == 3
    eval_results = None
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, EvalStage):
            student.eval()
            eval_results = _eval_stage(i, stage, student, ctx)
            stages_run.append({"index": i, **stage.model_dump(mode="json")})
            continue
        stage_model = out / "stages" / f"{i}-{stage.kind}" / "model"
        if stage_model.is_dir():
            student = load_model(str(stage_model)).to(device)
            if is_main:
                print(f"stage {i} ({stage.kind}) already finished; loaded {stage_model}", flush=True)
        else:
            method = method_for(stage, ctx)
            student = _detached(train_stage(i, method, student, ctx), zero3)
            if is_main:
                export_model(student, tokenizer, stage_model, {"stage": i, "kind": stage.kind})
            barrier()
        stages_run.append({"index": i, **stage.model_dump(mode="json"), "steps": recipe.stage_steps(stage)})

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
    }
    if is_main:
        export_model(student, tokenizer, out / "final", summary)
        rows.append({"model": "student (final)", "params": summary["student_params"],
                     "bytes_on_disk": bytes_on_disk(out / "final"), **final})
        if ctx.teacher is not None:
            rows[0].update(student_ppl=final["teacher_ppl"], ppl_ratio=1.0, top1_agreement=1.0, kl=0.0,
                           bytes_on_disk=rows[0]["params"] * t_dtype.itemsize)
        summary["table"] = rows
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        logger.summary({f"final/{k}": v for k, v in final.items()})
        print("\n" + format_table([{**r, "ppl": r.get("student_ppl")} for r in rows],
                                  ["model", "params", "bytes_on_disk", "ppl", "ppl_ratio", "top1_agreement", "kl"]))
        from compress.tracking import read_metrics
        from compress.report import eval_tables, write_report

        if eval_results is not None:
            (out / "eval.json").write_text(json.dumps(eval_results, indent=2, default=str))
            print("\n" + eval_tables(eval_results))
        report = write_report(out, results=eval_results, metrics=read_metrics(str(out)), summary=summary, logger=logger)
        print(f"\nexported to {out / 'final'}; report: {report}", flush=True)
    logger.finish()
    barrier()
    if eval_results is not None and not eval_results["passed"]:
        from eval.runner import failures

        raise GateFailure("quality gates failed: " + "; ".join(failures(eval_results))
                          + "; the export is kept, loosen the gate or improve the student")
    return summary

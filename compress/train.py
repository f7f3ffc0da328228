"""The one training loop. Every method runs through it; methods differ only by their
``StageMethod`` (``compress.stages``): loss, wrap/unwrap, after-step hook.

DeepSpeed owns the optimizer step (ZeRO stage, gradient accumulation, clipping, bf16 on
GPU), checkpoints and resume. The data order is a pure function of (seed, step), so a run
resumed from step N continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from compress.checkpoint import latest_step, mark_complete, step_tag
from compress.constraints import constrained_params, enforce
from compress.data import rank_micro_indices, sample_indices
from compress.lora import add_lora
from compress.metrics import bits_per_byte, pair_metrics
from compress.models import rotary_kept_fp32
from compress.stages import RunContext, StageMethod


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def ds_config(tr, device: torch.device) -> dict:
    """DeepSpeed's config for the one loop.

    bf16 always trains with fp32 master weights and fp32 gradient accumulation: DeepSpeed's
    ZeRO-0 bf16 mode would step on the bf16 weights and sum micro-batch gradients in bf16, so
    ZeRO stage 0 runs as stage 1 there (on one rank that partitions nothing; its bf16 optimizer
    keeps the fp32 copy).
    """
    bf16 = use_bf16(tr.precision, device)
    stage = max(tr.zero_stage, 1) if bf16 else tr.zero_stage
    cfg = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def lr_lambda(tr, steps: int):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
    def f(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / (tr.warmup_steps + 1)
        progress = min(1.0, (step - tr.warmup_steps) / max(1, steps - tr.warmup_steps))
        return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(module: torch.nn.Module, tr) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    # no weight decay on norms, biases, or what a method marks ``no_decay`` (e.g. learned quantizer scales)
    decay = [p for p in params if p.ndim >= 2 and not getattr(p, "no_decay", False)]
    rest = [p for p in params if p.ndim < 2 or getattr(p, "no_decay", False)]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tr.lr, betas=tuple(tr.betas))


def _mean_over_ranks(values: dict, ctx: RunContext) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        torch.distributed.all_reduce(t)
        t /= ctx.world
    return dict(zip(keys, t.tolist()))


def evaluate(ctx: RunContext, student_logits) -> dict:
    """Held-out metrics of the student vs the teacher on the first ``train.eval_blocks`` blocks."""
    tr = ctx.recipe.train
    blocks = ctx.data.val[: tr.eval_blocks]
    kw = dict(batch_size=tr.micro_batch_size, rank=ctx.rank, world=ctx.world, device=ctx.device)
    # token-by-token comparisons need one vocabulary: across tokenizers, the student's own metrics
    # and both models' bits per byte of the same text
    cross = ctx.teacher is not None and ctx.teacher_tokenizer is not None
    out = pair_metrics(student_logits, None if cross or ctx.teacher is None else ctx.teacher.logits, blocks, **kw)
    if cross:
        out |= bits_per_byte(student_logits, ctx.teacher.logits, blocks, ctx.tokenizer, ctx.teacher_tokenizer, **kw)
    return out


def train_stage(index: int, method: StageMethod, student: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
    """Run stage ``index`` to its last step (resuming if a checkpoint exists); returns the student."""
    import deepspeed

    tr, recipe = ctx.recipe.train, ctx.recipe
    steps = recipe.stage_steps(method.cfg)
    stage_dir = ctx.output_dir / "stages" / f"{index}-{method.cfg.kind}"
    ckpt_dir = stage_dir / "checkpoints"
    ctx.extra["stage_seed"] = recipe.seed + 1000 * index

    if method.cfg.lora is not None:  # folded back in by compress.pipeline.detached
        student = add_lora(student, method.cfg.lora)
    module = method.wrap(student)
    optimizer = make_optimizer(module, tr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tr, steps))
    with rotary_kept_fp32(module):
        engine, optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(tr, ctx.device)
        )

    start = latest_step(ckpt_dir) or 0
    if start:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=step_tag(start))
        method.load_state_dict(client.get("method", {}))
        if ctx.is_main:
            print(f"resumed stage {index} ({method.cfg.kind}) from step {start}", flush=True)
    ctx.logger.rewind(index, start)
    method.prepare(engine.module, stage_dir, steps)
    constraints = constrained_params(engine.module)
    enforce(constraints)  # before the first step, too: the stage starts from a feasible point

    n, gb = len(ctx.data.train), tr.micro_batch_size * tr.grad_accum * ctx.world
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"stage {index} {method.cfg.kind}",
               disable=not ctx.is_main, dynamic_ncols=True)
    engine.train()
    for step in bar:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        batch_ids = sample_indices(ctx.extra["stage_seed"], step, n, gb)
        sums: dict[str, float] = {}
        for micro in range(tr.grad_accum):
            idx = rank_micro_indices(batch_ids, micro, ctx.rank, ctx.world, tr.micro_batch_size)
            batch = {k: v.to(ctx.device) if k != "index" else v for k, v in ctx.data.batch(idx).items()}
            batch.update(step=step, micro=micro)  # for what a method draws per batch (on-policy KD)
            loss, logs = method.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.detach(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / tr.grad_accum
        method.after_step(engine, step)  # may change masks or scales ...
        enforce(constraints)  # ... which then hold in the master weights before any save
        done = step + 1
        if done % tr.log_every == 0 or done == steps:
            record = _mean_over_ranks(sums, ctx)
            record.update(stage=index, step=done, lr=lr,
                          step_time=time.perf_counter() - t0, tokens=done * gb * recipe.data.block_size)
            ctx.logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if tr.eval_every and done % tr.eval_every == 0 and done != steps:
            engine.eval()
            m = evaluate(ctx, lambda x: engine(input_ids=x).logits)
            engine.train()
            ctx.logger.log({"stage": index, "step": done, **{f"eval/{k}": v for k, v in m.items()}})
        if done % tr.save_every == 0 or done == steps:
            state = {"step": done, "method": method.state_dict()}
            engine.save_checkpoint(str(ckpt_dir), tag=step_tag(done), client_state=state, save_latest=False)
            ctx.barrier()
            if ctx.is_main:
                mark_complete(ckpt_dir, done, tr.keep_checkpoints)
            ctx.barrier()
    bar.close()
    engine.eval()
    return method.unwrap(engine.module)

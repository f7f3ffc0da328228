"""Knowledge distillation as a stage of the one training loop.

    stages:
      - kind: distill
        loss: forward_kl        # reverse_kl | jsd | skew_kl | skew_reverse_kl
        temperature: 1.0
        ce_weight: 0.0          # mix in next-token CE on the data
        top_k: 64               # optional: teacher's top-k + a tail bin (memory)
        hidden_weight: 0.0      # optional: hidden-state MSE via a learned projection
        offline: {}             # optional: top-k teacher log-probs precomputed to disk

The loss is ``kd_weight * KD + ce_weight * CE + hidden_weight * MSE`` (losses in
``compress.losses``). The teacher runs frozen under no_grad (``compress.teacher``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import Strict
from compress.data import sample_indices
from compress.errors import CompressError
from compress.losses import KD_LOSSES, ce_loss, hidden_mse, kd_loss
from compress.offline_kd import precompute
from compress.stages import StageConfig, StageMethod, register, with_model_losses


class OfflineKD(Strict):
    """Top-k teacher log-probs computed once to disk (sharded, resumable), streamed in training."""

    dir: str | None = None  # default: <output_dir>/stages/<i>-distill/teacher_topk
    shard_blocks: int = Field(64, ge=1)


class DistillStage(StageConfig):
    """Knowledge distillation (Hinton et al. 2015) with a choice of divergence."""

    kind: Literal["distill"] = "distill"
    loss: Literal[KD_LOSSES] = "forward_kl"  # type: ignore[valid-type]
    temperature: float = Field(1.0, gt=0.0)
    kd_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)  # mix in next-token cross entropy on the data
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # jsd mixture weight
    skew_alpha: float = Field(0.1, ge=0.0, lt=1.0)  # skew_kl / skew_reverse_kl
    top_k: int | None = Field(None, ge=1)  # keep only the teacher's top-k (+ a tail bin)
    hidden_weight: float = Field(0.0, ge=0.0)  # hidden-state MSE through a learned projection
    hidden_layers: list[Annotated[int, Field(ge=-1)]] = Field(default_factory=lambda: [-1])
    offline: OfflineKD | None = None  # needs top_k

    @model_validator(mode="after")
    def _weights(self) -> "DistillStage":
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("all loss weights are 0; set kd_weight, ce_weight or hidden_weight > 0")
        if self.offline is not None and self.top_k is None:
            raise ValueError("offline KD stores top-k teacher log-probs: set top_k (e.g. 64)")
        if self.offline is not None and self.hidden_weight > 0:
            raise ValueError("offline KD stores no teacher hidden states: set hidden_weight=0")
        return self


class DistillModule(nn.Module):
    """The student plus what KD trains beside it (projections to the teacher's width)."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList | None):
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.student(input_ids=input_ids, output_hidden_states=output_hidden_states)


def teacher_layer(student_layer: int, n_student: int, n_teacher: int, layer_map: list[int] | None) -> int:
    """Teacher hidden-state index matched to a student one (-1 = last: last)."""
    if student_layer < 0 or student_layer >= n_student - 1:
        return n_teacher - 1
    if layer_map is not None:
        return layer_map[student_layer]
    return round((student_layer + 1) * n_teacher / n_student) - 1  # proportional depth


@register(DistillStage)
class Distill(StageMethod):
    needs_teacher = True

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        student = configs.get("student")
        if cfg.hidden_weight > 0 and student is not None:
            n = student.num_hidden_layers
            bad = [l for l in cfg.hidden_layers if l >= n]
            if bad:
                raise CompressError(f"distill.hidden_layers has {bad} but the student has {n} layers (0..{n - 1}, "
                                    "or -1 for the last); fix the indices")
        if recipe.teacher.shard == "zero3" and cfg.offline is not None:
            raise CompressError("offline KD runs the teacher once before training; teacher.shard=zero3 is not needed "
                                "there: set teacher.shard=none")

    def wrap(self, student: nn.Module) -> nn.Module:
        projections = None
        if self.cfg.hidden_weight > 0:
            d_s, d_t = student.config.hidden_size, self.ctx.teacher.config.hidden_size
            # learned projection only where widths differ; identity otherwise
            projections = nn.ModuleList(
                [nn.Linear(d_s, d_t, bias=False) if d_s != d_t else nn.Identity() for _ in self.cfg.hidden_layers]
            )
        self.cache = None
        return DistillModule(student, projections)

    def prepare(self, module: nn.Module, stage_dir: Path, steps: int) -> None:
        if self.cfg.offline is None:
            return
        ctx, tr = self.ctx, self.ctx.recipe.train
        gb = tr.micro_batch_size * tr.grad_accum * ctx.world
        seed = ctx.extra["stage_seed"]
        blocks = torch.cat([sample_indices(seed, s, len(ctx.data.train), gb) for s in range(steps)]).tolist()
        root = Path(self.cfg.offline.dir) if self.cfg.offline.dir else stage_dir / "teacher_topk"
        self.cache = precompute(
            ctx.teacher, ctx.data, blocks, root, k=self.cfg.top_k, temperature=self.cfg.temperature,
            key_parts=[ctx.recipe.teacher.source, ctx.data.key], shard_blocks=self.cfg.offline.shard_blocks,
            batch_size=tr.micro_batch_size, rank=ctx.rank, world=ctx.world, barrier=ctx.barrier, device=ctx.device,
        )

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg, x = self.cfg, batch["input_ids"]
        want_hidden = cfg.hidden_weight > 0
        out = module(input_ids=x, output_hidden_states=want_hidden)
        kd_args = dict(kind=cfg.loss, temperature=cfg.temperature, beta=cfg.beta, skew_alpha=cfg.skew_alpha)
        logs = {}
        if self.cache is not None:
            ids, logprobs = self.cache.get(batch["index"], x.device)
            kd = kd_loss(out.logits, teacher_topk=(ids, logprobs), teacher_vocab=self.cache.vocab_size, **kd_args)
        else:
            t_out = self.ctx.teacher(x, hidden=want_hidden)
            kd = kd_loss(out.logits, t_out.logits, top_k=cfg.top_k, **kd_args)
        total = cfg.kd_weight * kd
        logs["kd"] = kd.detach()
        if cfg.ce_weight > 0:
            ce = ce_loss(out.logits, batch["labels"])
            total = total + cfg.ce_weight * ce
            logs["ce"] = ce.detach()
        if want_hidden:
            inner = module.module if hasattr(module, "module") else module  # DeepSpeed engine
            n_s, n_t = len(out.hidden_states) - 1, len(t_out.hidden_states) - 1
            mse = sum(
                hidden_mse(out.hidden_states[l + 1 if l >= 0 else n_s],
                           t_out.hidden_states[teacher_layer(l, n_s, n_t, self.ctx.layer_map) + 1].to(out.hidden_states[0].dtype),
                           proj=proj)
                for l, proj in zip(cfg.hidden_layers, inner.projections)
            ) / len(cfg.hidden_layers)
            total = total + cfg.hidden_weight * mse
            logs["hidden_mse"] = mse.detach()
        return with_model_losses(total, logs, out, module)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.student

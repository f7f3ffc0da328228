"""The stage interface and registry: how a method plugs into the one training loop.

A method registers a ``StageMethod`` subclass for its recipe config type:

    @register(DistillStage)
    class Distill(StageMethod):
        def loss(self, module, batch): ...

The loop (``compress.train.train_stage``) calls, in order: ``wrap`` once (add trainable
parts such as a projection), ``prepare`` once after resume is known (e.g. precompute
offline teacher logits), ``loss`` per micro batch, ``after_step`` per optimizer step (a
hook for mask re-application or quantizer updates), and ``unwrap`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.losses import ce_loss
from compress.recipe import FinetuneStage

STAGE_METHODS: dict[type, type["StageMethod"]] = {}


def register(config_type: type):
    def wrap(cls):
        STAGE_METHODS[config_type] = cls
        return cls
    return wrap


def method_for(cfg, ctx: "RunContext") -> "StageMethod":
    return STAGE_METHODS[type(cfg)](cfg, ctx)


@dataclass
class RunContext:
    """What every stage can see of the run."""

    recipe: Any
    output_dir: Path
    tokenizer: Any
    data: Any  # compress.data.TokenData
    logger: Any  # compress.tracking.RunLogger
    device: torch.device
    rank: int = 0
    world: int = 1
    teacher: Any = None  # compress.teacher.Teacher, when a stage needs one
    layer_map: list[int] | None = None  # student layer i came from teacher layer layer_map[i]
    extra: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class StageMethod:
    """Base: plain next-token training of the student."""

    needs_teacher = False

    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx

    def wrap(self, student: nn.Module) -> nn.Module:
        return student

    def prepare(self, module: nn.Module, stage_dir: Path, steps: int) -> None:
        pass

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = module(input_ids=batch["input_ids"])
        loss = ce_loss(out.logits, batch["labels"])
        return loss, {"ce": loss.detach()}

    def after_step(self, module: nn.Module, step: int) -> None:
        pass

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module


@register(FinetuneStage)
class Finetune(StageMethod):
    """Cross-entropy on the data only; the baseline that distillation must beat."""

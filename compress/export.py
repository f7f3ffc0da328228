"""Export: a folder that plain ``AutoModelForCausalLM.from_pretrained`` loads.

    <dir>/config.json, model.safetensors, tokenizer files, generation_config.json
    <dir>/compression.json   resolved recipe, teacher identity, stages run, final metrics

Written to ``<dir>.tmp-<pid>`` and renamed into place (``compress.checkpoint.publish_dir``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from torch import nn

from compress.checkpoint import publish_dir
from compress.errors import CompressError
from compress.modelio import custom_modules, materialize


def bytes_on_disk(folder: str | os.PathLike, pattern: str = "model*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))


def packed_state(model: nn.Module) -> tuple[dict, dict] | None:
    """(state dict, quantization_config) where custom modules store themselves packed
    (``export_tensors``, e.g. ``QuantLinear`` in compressed-tensors' layout); None if none do.
    Other custom modules are materialized into stock ones first."""
    dtype = next(model.parameters()).dtype
    custom = custom_modules(model)
    packed = {n: m.export_tensors(dtype) for n, m in custom.items() if hasattr(m, "export_tensors")}
    packed = {n: tensors for n, tensors in packed.items() if tensors is not None}  # None: export materialized
    if not packed:
        return None
    packers = {n: custom[n] for n in packed}
    for name, m in custom.items():
        if name not in packers:
            model.set_submodule(name, m.materialize())
    state = dict(model.state_dict())
    for name, tensors in packed.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        at = name.rpartition(".")[0] if getattr(packers[name], "export_at_parent", False) else name
        state.update({f"{at}.{k}": v for k, v in tensors.items()})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    kept_float = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # e.g. lm_head
    writers = {type(m).export_config for m in packers.values() if hasattr(m, "export_config")}
    if len(writers) != 1:
        raise CompressError("a packed export needs one quantized-weights stage to write its quantization_config "
                            "(KV-cache scales alone are not exported packed)")
    qconfig = writers.pop()(packers, kept_float)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}, qconfig


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: dict) -> Path:
    """A plain HF folder: custom modules (masks, ...) become their stock equivalents, and quantized
    ones are written packed with their ``quantization_config`` (compressed-tensors). A model's
    own ``quantization_config`` is kept (the GGUF loader's is already dropped at load time)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    packed = None
    if custom_modules(model):
        model = copy.deepcopy(model)
        packed = packed_state(model)
        if packed is None:
            model = materialize(model)
    # for users who generate with the export: generate() reads generation_config, which a model built
    # with from_config (gqa, upcycle, pruning) copied from a training config with use_cache off
    gen = getattr(model, "generation_config", None)
    gen_cache = getattr(gen, "use_cache", None)
    model.config.use_cache = True
    if gen is not None:
        gen.use_cache = True
    try:
        if packed is not None:
            state, qconfig = packed
            config = copy.deepcopy(model.config)
            config.quantization_config = qconfig
            tmp.mkdir(parents=True)
            config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = dict(info, bytes_on_disk=bytes_on_disk(tmp))
        (tmp / "compression.json").write_text(json.dumps(info, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.use_cache = False
        if gen is not None:
            gen.use_cache = gen_cache
    publish_dir(tmp, out)
    return out

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
from compress.modelio import custom_modules, materialize


def bytes_on_disk(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: dict) -> Path:
    """A plain HF folder: custom modules (masks, fake-quant, ...) become their stock equivalents.
    A model's ``quantization_config`` is kept (the GGUF loader's is already dropped at load time)."""
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if custom_modules(model):
        model = materialize(copy.deepcopy(model))
    model.config.use_cache = True  # for users who generate with the export
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = dict(info, bytes_on_disk=bytes_on_disk(tmp))
        (tmp / "compression.json").write_text(json.dumps(info, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.use_cache = False
    publish_dir(tmp, out)
    return out

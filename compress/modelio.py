"""How a model that is not a stock HF model passes between stages, in process and after a resume.

A stage's result is a folder:
    config.json          the HF config (shape changes a method makes are written into it)
    model.safetensors    the full state dict: weights AND buffers (masks, quantizer scales, ...)
    modules.json         {fqn: {"type": name, "spec": {...}}} for every non-stock module

``load_stage_model`` builds the architecture from the config, puts each recorded module back
(``type.from_spec(spec)``), re-sizes plain ``nn.Linear``s whose saved shape differs (a pruned
width), and loads the state dict strictly. A method's custom module registers itself once:

    @register_module
    class MaskedLinear(nn.Linear):
        def spec(self) -> dict: ...                      # what from_spec needs (shapes, options)
        @classmethod
        def from_spec(cls, spec) -> "MaskedLinear": ...
        def materialize(self) -> nn.Module: ...          # a stock module for a plain HF export
        @classmethod
        def attached(cls, model): ...                    # optional: re-install hooks after loading
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from compress.checkpoint import publish_dir

CUSTOM_MODULES: dict[str, type[nn.Module]] = {}


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    for need in ("spec", "from_spec", "materialize"):
        assert hasattr(cls, need), f"{cls.__name__} must define {need}() to be saved between stages"
    CUSTOM_MODULES[cls.__name__] = cls
    return cls


def custom_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ in CUSTOM_MODULES}


def module_specs(model: nn.Module) -> dict[str, dict]:
    return {name: {"type": type(m).__name__, "spec": m.spec()} for name, m in custom_modules(model).items()}


def materialize(model: nn.Module) -> nn.Module:
    """Replace every custom module by its stock equivalent (in place), for a plain HF export."""
    for name, m in custom_modules(model).items():
        model.set_submodule(name, m.materialize())
    return model


def _skeleton(config, specs: dict[str, dict], state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, entry in specs.items():
        if entry["type"] not in CUSTOM_MODULES:
            from compress.errors import CompressError

            raise CompressError(f"module type {entry['type']!r} (at {name}) is not registered; import the method that "
                                "defines it (add its module to the recipe's `plugins:`)")
        model.set_submodule(name, CUSTOM_MODULES[entry["type"]].from_spec(entry["spec"]))
    for cls in {type(m) for m in custom_modules(model).values()}:
        if hasattr(cls, "attached"):  # e.g. hooks a module installs on its parent
            cls.attached(model)
    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if type(m) is nn.Linear and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            model.set_submodule(name, nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in state))
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Strict load, except that of tied tensors (embeddings and head) one name suffices."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    groups: dict[int, set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), set()).add(name)
    unloaded = [k for k in missing if not any(g & state.keys() for g in groups.values() if k in g)]
    assert not unexpected and not unloaded, f"state does not fit the model: unexpected {unexpected}, missing {unloaded}"
    return model


def rebuild(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh, unpartitioned copy of ``model``'s architecture holding ``state``."""
    from compress.models import rotary_kept_fp32

    fresh = _load_state(_skeleton(model.config, module_specs(model), state), state)
    with rotary_kept_fp32(fresh):
        return fresh.to(next(iter(state.values())).dtype)


def save_stage_model(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (any registered custom modules included) atomically to ``out_dir``."""
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops tied duplicates
        (tmp / "modules.json").write_text(json.dumps(module_specs(model), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    return out


def is_stage_model(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "modules.json").is_file()


def load_stage_model(folder: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    from transformers import AutoConfig

    folder = Path(folder)
    state = load_file(str(folder / "model.safetensors"))
    specs = json.loads((folder / "modules.json").read_text())
    model = _skeleton(AutoConfig.from_pretrained(folder), specs, state)
    model = _load_state(model, state).to(device)
    model.config.use_cache = False
    return model

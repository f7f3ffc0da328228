"""An export loaded onto our kernels: the model as it would be served.

    model = load_kernel_model("runs/x/final")     # transformers builds it; each quantized or 2:4
                                                  # linear is then replaced by a kernel module

``launch/evaluate.py --kernels`` judges a compressed student this way (lm-eval, the speculative-
decoding check). On CUDA the modules run the Triton kernels, elsewhere their PyTorch references.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kernels.modules import QuantLinearKernel, Sparse24LinearKernel


def kernel_modules(folder: str | Path) -> dict[str, nn.Module]:
    """{linear name: kernel module} for what the export at ``folder`` stores compressed (2:4 first)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(f))
    out = {}
    sparse = folder / "sparse24.safetensors"
    if sparse.is_file():
        s24 = load_file(sparse)
        for key in s24:
            if key.endswith(".meta"):
                name = key[: -len(".meta")]
                in_features = int(s24[f"{name}.shape"][1])
                bias = state.get(f"{name}.bias")
                if f"{name}.codes" in s24:
                    out[name] = Sparse24LinearKernel(s24[f"{name}.codes"], s24[key], s24[f"{name}.weight_scale"],
                                                     in_features, bias)
                else:
                    out[name] = Sparse24LinearKernel(s24[f"{name}.values"], s24[key], None, in_features, bias)
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("format") == "pack-quantized":
        bits = qc["config_groups"]["group_0"]["weights"]["num_bits"]
        for key in state:
            if key.endswith(".weight_packed"):
                name = key[: -len(".weight_packed")]
                if name not in out:
                    out[name] = QuantLinearKernel(state[key], state[f"{name}.weight_scale"],
                                                  state.get(f"{name}.weight_zero_point"), bits, state.get(f"{name}.bias"))
    return out


def load_kernel_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The export as transformers loads it, with its compressed linears on kernel modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    modules = kernel_modules(folder)
    for name, module in modules.items():
        model.set_submodule(name, module.to(device))
    model.config.kernel_modules = len(modules)  # how many linears run on kernels (reports read it)
    return model

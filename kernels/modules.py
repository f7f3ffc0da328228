"""Kernel-backed linear layers (``eval.kernel_model.load_kernel_model`` puts an export onto them).

``QuantLinearKernel`` reads compressed-tensors' ``pack-quantized`` tensors (``weight_packed``,
``weight_scale``, ``weight_zero_point``) from the export's safetensors; ``Sparse24LinearKernel``
reads ``sparse24.safetensors`` (values, or int4 codes + scales, and metadata). On CUDA they run
the Triton kernels; elsewhere (or for a shape a kernel does not take) the PyTorch reference of the
same math, logged once per reason. The weights stay compressed in memory either way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.sparse24 import torch_sparse24, triton_sparse24
from kernels.tiles import INTERPRET
from kernels.wna16 import torch_wna16, triton, triton_wna16

log = logging.getLogger("kernels")
_said: set[str] = set()


def _once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("kernels: %s: using the PyTorch reference path", reason)


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None:
        _once("triton is not installed")
        return False
    if not x.is_cuda and not INTERPRET:
        _once(f"input on {x.device.type}, not CUDA")
        return False
    return True


class QuantLinearKernel(nn.Module):
    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.bits, self.out_features, self.in_features = bits, packed.shape[0], packed.shape[1] * 32 // bits
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x):
            try:  # triton_wna16 checks its inputs before anything runs
                return triton_wna16(x, self.packed, self.scale.to(x.dtype), self.zero, self.bits, self.bias)
            except ValueError as e:
                _once(str(e))
        return torch_wna16(x, self.packed, self.scale, self.zero, self.bits, self.bias)


class Sparse24LinearKernel(nn.Module):
    def __init__(self, values_or_codes: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor | None,
                 in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = meta.shape[0], in_features
        self.register_buffer("values", values_or_codes)
        self.register_buffer("meta", meta)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values if self.scale is not None else self.values.to(x.dtype)
        if _use_triton(x):
            try:  # triton_sparse24 checks its inputs before anything runs
                scale = self.scale.to(x.dtype) if self.scale is not None else None
                return triton_sparse24(x, values, self.meta, scale, self.bias)
            except ValueError as e:
                _once(str(e))
        return torch_sparse24(x, values, self.meta, self.scale, self.bias)

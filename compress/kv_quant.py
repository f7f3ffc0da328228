"""KV-cache quantization: K and V fake-quantized where the cache stores them, with static scales
calibrated on real text, exported as compressed-tensors' ``kv_cache_scheme``.

    attach_kv_quant(model, KVSpec("fp8", per_head=True))   # a KVQuant under every self_attn
    calibrate_kv(model, blocks)                            # scales from the largest |K|, |V| seen
    model(...)                                             # K, V now round as the cache would

Where: the post-RoPE keys and the values that the attention hands to ``cache.update`` (what a
serving stack writes into its cache), so the attention reads them rounded, as served. A forward
pre-hook on the attention module passes its ``cache`` argument through a wrapper whose ``update``
fake-quantizes K and V (straight-through in the backward, so QAT learns the rounding) and then
calls the real cache, if any: compressed-tensors' own mechanism.

The math, per tensor (one scale) or per KV head (a scale per head, shape (H_kv, 1, 1)):
    fp8:  s = amax / 448,  x_hat = e4m3(x / s) * s
    int8: s = amax / 127,  x_hat = clamp(round(x / s), -128, 127) * s
each scale rounded up to a bf16 value (the export stores it; it never clips the calibrated max).
The scales are buffers (``k_scale``, ``v_scale``): saved with the stage model and the DeepSpeed
checkpoint, exported as ``self_attn.k_scale`` / ``v_scale``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from compress.modelio import register_module
from compress.quant import representable, ste
from compress.quant_float import E4M3_MAX, round_e4m3


@dataclass(frozen=True)
class KVSpec:
    format: str = "fp8"  # fp8 | int8
    per_head: bool = False

    @property
    def qmax(self) -> float:
        return E4M3_MAX if self.format == "fp8" else 127.0

    def bytes_per_token(self, config) -> int:
        from compress.models import head_dim

        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)  # 1 byte per value

    def ct_scheme(self) -> dict:
        return {"num_bits": 8, "type": "float" if self.format == "fp8" else "int", "symmetric": True,
                "dynamic": False, "strategy": "attn_head" if self.per_head else "tensor"}


def kv_qdq(x: torch.Tensor, scale: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """x (B, H_kv, T, D) fake-quantized with its static scale; identity gradient."""
    s = scale.to(x.dtype)
    if spec.format == "fp8":
        x_hat = round_e4m3(x.detach() / s) * s
    else:
        x_hat = torch.round(x.detach() / s).clamp(-128, 127) * s
    return ste(x, x_hat)


@register_module
class KVQuant(nn.Module):
    """K/V scales of one attention module and the fake-quant its cache hook applies."""

    export_at_parent = True  # its tensors are the attention's k_scale / v_scale in the export

    def __init__(self, kv_heads: int, fmt: str = "fp8", per_head: bool = False):
        super().__init__()
        self.kv = KVSpec(fmt, per_head)
        shape = (kv_heads, 1, 1) if per_head else (1,)
        self.register_buffer("k_scale", torch.ones(shape))
        self.register_buffer("v_scale", torch.ones(shape))
        self.observing = False  # calibration: record amax instead of rounding
        self.kv_heads = kv_heads

    def spec(self) -> dict:
        return {"kv_heads": self.kv_heads, "fmt": self.kv.format, "per_head": self.kv.per_head}

    @classmethod
    def from_spec(cls, spec: dict) -> "KVQuant":
        return cls(spec["kv_heads"], spec["fmt"], spec["per_head"])

    def materialize(self) -> nn.Module:
        return nn.Identity()  # a float KV cache: the dequantized export has no KV scheme

    @classmethod
    def attached(cls, model: nn.Module) -> None:
        attach_kv_quant(model)

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observing:
            dims = (0, 2, 3) if self.kv.per_head else (0, 1, 2, 3)
            for name, x in (("k_scale", k), ("v_scale", v)):
                amax = x.detach().float().abs().amax(dim=dims).reshape(getattr(self, name).shape)
                getattr(self, name).copy_(torch.maximum(getattr(self, name), amax))
            return k, v
        return kv_qdq(k, self.k_scale, self.kv), kv_qdq(v, self.v_scale, self.kv)

    def export_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"k_scale": self.k_scale.to(dtype), "v_scale": self.v_scale.to(dtype)}


class _QuantizingCache:
    """What the attention sees as its cache: rounds K/V, then hands them to the real cache."""

    def __init__(self, quant: KVQuant, cache):
        self.quant, self.cache = quant, cache

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = self.quant(key_states, value_states)
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["cache"], name)


def _cache_kwarg(attn: nn.Module) -> str:
    params = inspect.signature(attn.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kv_cache_hook(attn: nn.Module, args, kwargs):
    quant = getattr(attn, "kv_quant", None)
    if isinstance(quant, KVQuant):
        name = _cache_kwarg(attn)
        kwargs[name] = _QuantizingCache(quant, kwargs.get(name))
    return args, kwargs


def attach_kv_quant(model: nn.Module, spec: KVSpec | None = None) -> dict[str, KVQuant]:
    """A ``KVQuant`` under every ``self_attn`` (new ones from ``spec``, or those already there,
    e.g. after a stage model is loaded), each with the cache hook; returns them by name."""
    out = {}
    for name, m in model.named_modules():
        if not name.endswith("self_attn"):
            continue
        if spec is not None:
            m.kv_quant = KVQuant(m.config.num_key_value_heads, spec.format, spec.per_head).to(m.o_proj.weight.device)
        if isinstance(getattr(m, "kv_quant", None), KVQuant):
            if not getattr(m, "_kv_hooked", False):
                m.register_forward_pre_hook(kv_cache_hook, with_kwargs=True)
                m._kv_hooked = True
            out[f"{name}.kv_quant"] = m.kv_quant
    return out


@torch.no_grad()
def calibrate_kv(model: nn.Module, quants: dict[str, KVQuant], blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Static scales from the largest |K| and |V| over ``blocks`` ((N, T) token ids)."""
    for q in quants.values():
        q.k_scale.zero_(), q.v_scale.zero_()
        q.observing = True
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size])
    finally:
        for q in quants.values():
            q.observing = False
    amax = {}
    for name, q in quants.items():
        amax[name] = (q.k_scale.max().item(), q.v_scale.max().item())
        for buf in (q.k_scale, q.v_scale):
            buf.copy_(representable(torch.where(buf > 0, buf / q.kv.qmax, torch.ones_like(buf)), torch.bfloat16))
    return amax

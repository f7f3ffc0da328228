"""Weight formats behind one interface: what the fake-quant forward, GPTQ, the packed export and
the compressed-tensors config each ask of a format.

A format quantizes blocks of ``block`` consecutive input columns (None: a whole row) with
parameters computed from the block (scales, zero points) and, for some, from the whole tensor
first (NVFP4's tensor scale, FP8's per-tensor scale):

    fmt = weight_format("nvfp4")
    st = fmt.tensor_state(w)                        # {name: (1,) tensor}, once per weight
    p = fmt.params(wg, st)                          # wg (out, groups, block) -> {name: (out, groups)}
    x_hat = fmt.qdq_elem(x, p, st)                  # x (out, groups, k): values rounded with their block's p
    qp = fmt.quant_params(w)                        # st and p of the whole weight, in one dict
    w_hat = fmt.qdq(w, qp)                          # the fake-quant forward (qp None: computed from w)

Parameters are recomputed from the weight at every step by default; a module may hold them
fixed instead (GPTQ's, whose rounded weights do not give back the scales they were rounded with).

The observer picks a block's params: ``minmax`` (the default) from the block's range, so its
largest value is on the grid; ``mse`` (``fmt.observer = "mse"``) from the range shrunk by the
ratio r in 1.00, 0.99, ..., 0.70 that gives the block the least squared rounding error (values
beyond the shrunk range clip; a coarse grid with a few clipped outliers often rounds the rest
closer). On SmolLM2's projections no block of int4 g64, NVFP4 or MXFP4 picked a ratio below 0.70
when 0.50 was allowed, so the search stops there. ``fmt.fit(wg, st)`` is the observer's choice;
``quant_params`` and GPTQ use it.

GPTQ (compress.gptq) uses the same three steps column by column, so every format here gets the
error-compensating PTQ for free. ``pack`` writes compressed-tensors' tensors for the module,
``ct_scheme`` its config group. The math of each format is in ``compress.quant`` (int, GGUF) and
``compress.quant_float`` (fp8, NVFP4, MXFP4).
"""

from __future__ import annotations

import torch

from compress import quant_float as qf
from compress.errors import CompressError
from compress.quant import IntSpec, _qparams, gguf_round, gguf_scale, int_round, pack_int32


CLIP_RATIOS = tuple(1 - i / 100 for i in range(31))  # the ranges the mse observer tries: 1.00, 0.99, ..., 0.70
OBSERVERS = ("minmax", "mse")


class WeightFormat:
    name: str
    block: int | None = None      # columns sharing one set of params (None: a whole row)
    ct_format: str | None = None  # compressed-tensors' format name; None: not exportable there
    observer: str = "minmax"      # how ``fit`` picks a block's params (OBSERVERS)

    def check(self, in_features: int, name: str = "weight") -> None:
        if self.block and in_features % self.block:
            raise CompressError(f"{self.name} quantizes blocks of {self.block} input features; {name}'s "
                                f"{in_features} is not a multiple: add it to `ignore` or use another format")

    def tensor_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def params(self, wg: torch.Tensor, st: dict) -> dict[str, torch.Tensor]:
        """The params of blocks wg (out, groups, block) from their range: the minmax observer."""
        raise NotImplementedError

    def fit(self, wg: torch.Tensor, st: dict, rows: int = 4096) -> dict[str, torch.Tensor]:
        """The params the observer picks for blocks wg (out, groups, block); ``rows`` at a time (mse)."""
        if self.observer == "minmax":
            return self.params(wg, st)
        parts = [self._least_error(chunk, st) for chunk in wg.split(rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _least_error(self, wg: torch.Tensor, st: dict) -> dict[str, torch.Tensor]:
        def error(p):
            return (self.qdq_elem(wg, p, st) - wg).pow(2).sum(-1)

        best = self.params(wg, st)  # ratio 1.00
        err = error(best)
        for r in CLIP_RATIOS[1:]:  # ties keep the wider range
            p = self.params(wg * r, st)
            e = error(p)
            better = e < err
            best = {k: torch.where(better, v, best[k]) for k, v in p.items()}
            err = torch.where(better, e, err)
        return best

    def _round(self, x: torch.Tensor, p: dict, st: dict) -> torch.Tensor:
        """x (..., k) rounded with per-row params p (..., 1): the format's stored values."""
        raise NotImplementedError

    def _scale(self, p: dict, st: dict) -> torch.Tensor:
        return p["scale"]

    def qdq_elem(self, x: torch.Tensor, p: dict, st: dict) -> torch.Tensor:
        p = {k: v[..., None] for k, v in p.items()}
        return (self._round(x, p, st) - p.get("zero", 0)) * self._scale(p, st)

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        out, cols = w.shape
        return w.detach().float().reshape(out, cols // (self.block or cols), -1)

    def quant_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.tensor_state(w)
        return {**st, **self.fit(self.grouped(w), st)}

    def split(self, qp: dict) -> tuple[dict, dict]:
        """(per-group params, tensor state) of a ``quant_params`` dict."""
        return {k: v for k, v in qp.items() if v.ndim == 2}, {k: v for k, v in qp.items() if v.ndim != 2}

    def qdq(self, w: torch.Tensor, qp: dict | None = None) -> torch.Tensor:
        """The dequantized weight (float32) the format stores for ``w`` (with params ``qp``)."""
        p, st = self.split(qp if qp is not None else self.quant_params(w))
        return self.qdq_elem(self.grouped(w), p, st).reshape(w.shape)

    def values(self, w: torch.Tensor, qp: dict) -> tuple[torch.Tensor, dict, dict]:
        """(stored values (out, in) as float, per-group params, tensor state)."""
        p, st = self.split(qp)
        pb = {k: v[..., None] for k, v in p.items()}
        return self._round(self.grouped(w), pb, st).reshape(w.shape), p, st

    def pack(self, w: torch.Tensor, dtype: torch.dtype, qp: dict) -> dict[str, torch.Tensor]:
        raise CompressError(f"{self.name} weights have no compressed-tensors layout; use export: dequantized")

    def ct_scheme(self) -> dict:
        raise NotImplementedError


class IntFormat(WeightFormat):
    ct_format = "pack-quantized"

    def __init__(self, bits: int = 4, group_size: int | None = 64, symmetric: bool = True):
        self.spec = IntSpec(bits, group_size, symmetric)
        self.block, self.name = group_size, f"int{bits}"

    def check(self, in_features: int, name: str = "weight") -> None:
        self.spec.groups(in_features, name)

    def params(self, wg, st):
        scale, zero = _qparams(wg, self.spec)
        return {"scale": scale, "zero": zero}

    def _round(self, x, p, st):
        return int_round(x, p["scale"], p["zero"], self.spec)

    def pack(self, w, dtype, qp):
        q, p, st = self.values(w, qp)
        out = {"weight_packed": pack_int32(q.to(torch.int8), self.spec.bits), "weight_scale": p["scale"].to(dtype),
               "weight_shape": torch.tensor(list(w.shape))}
        if not self.spec.symmetric:  # unpacked: the shape transformers' loader allocates for it
            out["weight_zero_point"] = p["zero"].to(torch.int8)
        return out

    def ct_scheme(self):
        s = self.spec
        return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "dynamic": False,
                "strategy": "group" if s.group_size else "channel", "group_size": s.group_size}


class FP8Format(WeightFormat):
    ct_format = "float-quantized"

    def __init__(self, per_channel: bool = True):
        self.per_channel, self.name = per_channel, "fp8"

    def tensor_state(self, w):
        return {} if self.per_channel else {"tensor_scale": qf.fp8_scale(w.detach().float().abs().amax().reshape(1))}

    def params(self, wg, st):
        return {"scale": qf.fp8_scale(wg.abs().amax(-1)) if self.per_channel else st["tensor_scale"].expand(len(wg), 1)}

    def _round(self, x, p, st):
        return qf.round_e4m3(x / p["scale"])

    def pack(self, w, dtype, qp):
        q, p, st = self.values(w, qp)
        return {"weight": q.to(torch.float8_e4m3fn),
                "weight_scale": (p["scale"] if self.per_channel else st["tensor_scale"]).to(dtype)}

    def ct_scheme(self):
        return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                "strategy": "channel" if self.per_channel else "tensor", "group_size": None}


class NVFP4Format(WeightFormat):
    ct_format, block, name = "nvfp4-pack-quantized", 16, "nvfp4"

    def tensor_state(self, w):
        return {"global_scale": qf.nvfp4_tensor_scale(w.detach().float().abs().amax())}

    def params(self, wg, st):  # the e4m3 value stored per block; the block's scale is it / global_scale
        return {"block_scale": qf.nvfp4_block_scale(wg.abs().amax(-1), st["global_scale"])}

    def _scale(self, p, st):
        return p["block_scale"] / st["global_scale"]

    def _round(self, x, p, st):
        return qf.fp4_values(x, self._scale(p, st))

    def pack(self, w, dtype, qp):
        q, p, st = self.values(w, qp)
        return {"weight_packed": qf.pack_e2m1(q), "weight_scale": p["block_scale"].to(torch.float8_e4m3fn),
                "weight_global_scale": st["global_scale"]}

    def ct_scheme(self):
        return {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor_group",
                "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"}


class MXFP4Format(WeightFormat):
    ct_format, block, name = "mxfp4-pack-quantized", 32, "mxfp4"

    def params(self, wg, st):  # the power-of-two exponent e of each block's scale 2^e
        return {"exponent": qf.mxfp4_exponent(wg.abs().amax(-1)).float()}

    def _scale(self, p, st):
        return torch.exp2(p["exponent"])

    def _round(self, x, p, st):
        return qf.fp4_values(x, self._scale(p, st))

    def pack(self, w, dtype, qp):
        q, p, st = self.values(w, qp)
        return {"weight_packed": qf.pack_e2m1(q), "weight_scale": (p["exponent"] + 127).to(torch.uint8)}

    def ct_scheme(self):
        return {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "group",
                "group_size": 32, "scale_dtype": "torch.uint8", "zp_dtype": None}


class GGUFFormat(WeightFormat):
    block = 32

    def __init__(self, kind: str):
        self.kind, self.name = kind, f"gguf_{kind}"

    def params(self, wg, st):  # ggml's float32 d (the file stores it as fp16)
        return {"d": gguf_scale(wg, self.kind).squeeze(-1)}

    def _scale(self, p, st):
        return p["d"].to(torch.float16).float()

    def _round(self, x, p, st):
        return gguf_round(x, p["d"], self.kind)


def weight_format(fmt: str, bits: int = 4, group_size: int | None = 64, symmetric: bool = True,
                  per_channel: bool = True, observer: str = "minmax") -> WeightFormat:
    if observer not in OBSERVERS:
        raise CompressError(f"observer {observer!r} is unknown; use {' or '.join(OBSERVERS)}")
    if fmt == "int":
        out = IntFormat(bits, group_size, symmetric)
    elif fmt == "fp8":
        out = FP8Format(per_channel)
    elif fmt in ("nvfp4", "mxfp4"):
        out = NVFP4Format() if fmt == "nvfp4" else MXFP4Format()
    elif fmt.startswith("gguf_"):
        out = GGUFFormat(fmt[5:])
    else:
        raise CompressError(f"weight format {fmt!r} is unknown; use int, fp8, nvfp4, mxfp4, gguf_q8_0 or gguf_q4_0")
    out.observer = observer
    return out

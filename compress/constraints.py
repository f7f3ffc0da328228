"""Constraints that must hold on weights after every optimizer step (a 2:4 or pruning mask, a
frozen block of zeros, a projection onto a quantization grid).

A module declares them; the spine enforces them for every training stage, whichever method
made the module:

    class MaskedLinear(nn.Linear):
        def constrained_params(self):
            yield self.weight, lambda w: w * self.mask.to(w.device, w.dtype)

Why not just ``weight.data.mul_(mask)`` after the step: with bf16, or with any ZeRO stage, the
optimizer keeps its own fp32 master copy of each parameter and the next step starts from THAT,
copying it back over the module's weight; a mask applied only to the module's weight is undone
one step later. ``enforce`` therefore projects the master copy (through DeepSpeed's
``safe_get/set_full_fp32_param``, which cover ZeRO 1-3 and the bf16 optimizer) and the working
copy (gathered under ZeRO-3), so the two never disagree.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Projection = Callable[[torch.Tensor], torch.Tensor]


def constrained_params(model: nn.Module) -> list[tuple[nn.Parameter, Projection]]:
    out = []
    for m in model.modules():
        fn = getattr(m, "constrained_params", None)
        if callable(fn) and m is not model:
            out += list(fn())
    return out


@torch.no_grad()
def enforce(pairs: Iterable[tuple[nn.Parameter, Projection]]) -> None:
    """Project each parameter's fp32 master copy (if the optimizer has one) and its working copy."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for p, project in pairs:
        shape = getattr(p, "ds_shape", p.shape)
        master = safe_get_full_fp32_param(p)  # None: the optimizer steps on p itself (fp32, no ZeRO)
        if master is not None:
            safe_set_full_fp32_param(p, project(master.reshape(shape)))
        if hasattr(p, "ds_id"):  # ZeRO-3: p.data is an empty local shard; gather, edit, re-partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(project(p.data))
        else:
            p.data.copy_(project(p.data))

"""A toy method, registered as a plugin (``plugins: [tests.toy_method]``), that exercises the spine
the way pruning, 2:4 sparsity and QAT will: a one-shot transform that changes the architecture
(drops a layer) and swaps modules (MLP down projections become ``MaskedLinear`` with a
magnitude mask chosen on calibration data), then training in which the mask must hold. At
``tighten_at`` the method halves the density in ``after_step``: state that changes during
training, so a resume must restore it from the checkpoint, not from the transform's result.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.modelio import register_module
from compress.models import drop_layers
from compress.stages import StageConfig, StageMethod, register


def magnitude_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """1 for the ``density`` fraction of largest scores in each row, else 0."""
    keep = max(1, int(round(score.shape[1] * density)))
    idx = score.topk(keep, dim=1).indices
    return torch.zeros_like(score).scatter_(1, idx, 1.0)


@register_module
class MaskedLinear(nn.Linear):
    """A Linear whose weight is kept at zero where ``mask`` is 0 (by the spine, after every step)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def constrained_params(self):
        yield self.weight, lambda w: w * self.mask.to(w.device, w.dtype)

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "MaskedLinear":
        return cls(**spec)

    def materialize(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.data.copy_(self.weight.data * self.mask)
        if self.bias is not None:
            out.bias.data.copy_(self.bias.data)
        return out


class ToyMaskStage(StageConfig):
    kind: Literal["toy_mask"] = "toy_mask"
    drop_layer: int = 0
    density: float = Field(0.5, gt=0, le=1)
    tighten_at: int | None = None  # after this step, halve the density


@register(ToyMaskStage)
class ToyMask(StageMethod):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.density = cfg.density

    def transform(self, model: nn.Module) -> nn.Module:
        n = model.config.num_hidden_layers
        model = drop_layers(model, [i for i in range(n) if i != self.cfg.drop_layer])
        calib = self.ctx.calibration(4)
        acts = {}
        hooks = [layer.mlp.down_proj.register_forward_hook(
            lambda m, inp, out, i=i: acts.__setitem__(i, inp[0].abs().flatten(0, 1).mean(0)))
            for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(input_ids=calib)
        for h in hooks:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            old = layer.mlp.down_proj
            new = MaskedLinear(old.in_features, old.out_features, bias=old.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            new.mask.copy_(magnitude_mask(old.weight.abs() * acts[i], self.density))  # Wanda-style score
            layer.mlp.down_proj = new
        return model

    def after_step(self, engine, step: int) -> None:
        if self.cfg.tighten_at is not None and step + 1 == self.cfg.tighten_at:
            self.density /= 2
            for m in engine.module.modules():
                if isinstance(m, MaskedLinear):
                    m.mask.mul_(magnitude_mask((m.weight.detach().float() * m.mask).abs(), self.density))

    def loss(self, module, batch):
        loss, logs = super().loss(module, batch)
        return loss, {**logs, "density": torch.tensor(self.density)}

    def state_dict(self) -> dict:
        return {"density": self.density}

    def load_state_dict(self, state: dict) -> None:
        self.density = state["density"]

"""Block-wise reconstruction of a quantized model (EfficientQAT's Block-AP, Chen et al. 2024; the
block-output objective of OmniQuant and AutoRound): each decoder layer, in turn, is trained so
that its output, fed by the already-quantized layers before it, matches the unquantized model's
output at the same depth on calibration text.

    originals = snapshot_layers(model)                  # before the linears are swapped
    ...swap to QuantLinear (round to nearest, or GPTQ)...
    errors = blockwise_model(model, blocks, originals, epochs=2, lr=1e-4)

The target is the original model's hidden state at that depth (its own stream, run beside the
quantized one), so a layer also makes up for the error the layers before it left. The loss is the
relative error of the layer's output per token, ||y - y*||^2 / ||y*||^2, averaged: tokens whose
residual stream is large (SmolLM2's first token) do not outweigh the rest. Every parameter of the
layer trains (the quantized linears through their straight-through estimator, learned scales
where the format has them, the norms), with Adam in float32 whatever the model's dtype; a format's
fixed params (GPTQ's grid) stay fixed, and a sparsity mask keeps its zeros. A layer that ends with
a larger error than it started with (too high an lr) is put back as it was. On SmolLM2, int4 g64,
16k calibration tokens: KL to the teacher 0.524 (round to nearest) -> 0.188, and GPTQ's 0.260 ->
0.116, in about 3 minutes on 2 CPU cores (README, Results).
"""

from __future__ import annotations

import copy
import time

import torch
from pydantic import Field
from torch import nn

from compress.calibration import decoder_layers, each_layer, layer_hidden, layer_output, with_hidden
from compress.config import Strict
from compress.constraints import constrained_params


SCALE_LR = 0.1  # learned scales (LSQ) take this fraction of the lr: a step moves them by a share of their size


class BlockwiseConfig(Strict):
    """A stage's ``blockwise:`` option (quantize, qat, sparsify): after its own edit of the weights,
    each decoder layer trained so its output matches the unedited model's at that depth."""

    calibration_blocks: int = Field(128, ge=1)  # blocks of the run's training split (seq_len tokens each)
    epochs: int = Field(2, ge=1)                # passes over them per layer
    lr: float = Field(1e-4, gt=0.0)             # Adam, float32

    def run(self, model: nn.Module, originals: list[nn.Module], ctx) -> dict:
        """``blockwise_model`` on the run's calibration text; what the transform reports."""
        t0 = time.time()
        blocks = ctx.calibration(self.calibration_blocks)
        errors = blockwise_model(model, blocks, originals, self.epochs, self.lr, ctx.recipe.train.micro_batch_size)
        return {"blockwise_tokens": blocks.numel(), "blockwise_seconds": round(time.time() - t0, 1),
                "blockwise_error_before": round(sum(e[0] for e in errors.values()) / len(errors), 5),
                "blockwise_error_after": round(sum(e[1] for e in errors.values()) / len(errors), 5)}


def snapshot_layers(model: nn.Module) -> list[nn.Module]:
    """A CPU copy of every decoder layer as it is now (the targets' source), taken before any swap."""
    return [copy.deepcopy(layer).cpu() for layer in decoder_layers(model)]


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def relative_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y - target||^2 / ||target||^2 (the last dimension is the feature)."""
    return ((y.float() - target.float()).pow(2).sum(-1) / target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


def blockwise_model(model: nn.Module, blocks: torch.Tensor, originals: list[nn.Module], epochs: int = 2,
                    lr: float = 1e-4, batch_size: int = 8, log=print) -> dict[int, tuple[float, float]]:
    """Train each decoder layer of ``model`` (its linears already quantized) towards ``originals``'
    outputs (``snapshot_layers`` of the model before quantization), layer by layer on ``blocks``
    ((n, T) token ids). Returns {layer: (relative error before, after)} on the calibration text."""
    errors: dict[int, tuple[float, float]] = {}
    n_layers = len(originals)
    stream: list[torch.Tensor] = []  # the original model's hidden states at the current depth
    t0 = time.time()

    def step(li, layer, run, tokens):
        nonlocal stream
        calls: list[tuple[tuple, dict]] = []
        hook = layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        try:
            run()  # collects this layer's inputs as the quantized layers before it produce them
        finally:
            hook.remove()
        if li == 0:  # the embeddings are not quantized: both streams start equal
            stream = [layer_hidden(a, k) for a, k in calls]
        original = originals[li].to(layer_hidden(*calls[0]).device)
        stream = [layer_output(original(*a, **k)) for a, k in (with_hidden(*c, x) for c, x in zip(calls, stream))]
        originals[li] = original.cpu()
        targets = [y.float() for y in stream]
        inputs = [_cast((a, k), torch.float32) for a, k in calls]
        params = [p for p in layer.parameters() if p.requires_grad]
        dtypes = [p.dtype for p in params]
        for p in params:  # Adam in float32 (a bf16 weight would drop most updates); buffers stay as they are
            p.data = p.data.float()

        def error() -> float:
            with torch.no_grad():
                return sum(float(relative_error(layer_output(layer(*a, **k)), y)) for (a, k), y in zip(inputs, targets)) \
                    / len(inputs)

        first, kept = error(), [p.detach().clone() for p in params]
        scales = [p for n, p in layer.named_parameters() if p.requires_grad and n.endswith(".scale")]
        rest = [p for p in params if all(p is not s for s in scales)]
        opt = torch.optim.Adam([{"params": rest}, {"params": scales, "lr": lr * SCALE_LR}], lr=lr)
        constraints = constrained_params(layer)  # a sparsity mask, as the spine keeps it after every step
        with torch.enable_grad():
            for _ in range(epochs):
                for (a, k), y in zip(inputs, targets):
                    loss = relative_error(layer_output(layer(*a, **k)), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p, project in constraints:
                            p.copy_(project(p))
        last = error()
        if not last < first:  # the lr overshot for this layer: keep it as it was
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)
            log(f"blockwise: layer {li + 1} ended worse ({first:.4g} -> {last:.4g}), kept as it was: lower blockwise.lr")
            last = first
        del opt, kept
        for p, dt in zip(params, dtypes):
            p.data = p.data.to(dt)
        errors[li] = (first, last)
        log(f"blockwise: layer {li + 1}/{n_layers}, relative error {first:.4g} -> {last:.4g} ({time.time() - t0:.0f} s)")

    each_layer(model, blocks, step, batch_size)
    return errors

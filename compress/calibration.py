"""The sequential calibration pipeline that GPTQ, SparseGPT, block-wise reconstruction and the GQA
pca merge share: run the decoder layers one at a time over cached calibration inputs, so each layer
is edited on the inputs the already-edited layers before it produce.

    each_layer(model, blocks, step)            # step(index, layer, run, tokens) per layer, in order
    layerwise(model, blocks, modules, solve)   # the same with H = 2 X^T X / tokens of each module's
                                               # inputs, then solve(name, module, H)
    input_moments(taps, run)                   # the input statistics both gather, as a layer runs
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positionally or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with other hidden states."""
    return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})


def layer_output(out) -> torch.Tensor:
    """A decoder layer's output hidden states (a tuple's first item in older transformers)."""
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    pass


@torch.no_grad()
def each_layer(model: nn.Module, blocks: torch.Tensor, step, batch_size: int = 8) -> None:
    """The sequential pipeline: capture the first decoder layer's inputs on ``blocks``, then for each layer
    in turn call ``step(index, layer, run, tokens)``, where ``run()`` runs the layer over its inputs (as the
    layers before it, already edited by their steps, produce them), and feed the layer's new outputs to
    the next. ``step`` attaches its own hooks around ``run()`` and may edit the layer."""
    layers = decoder_layers(model)
    inputs: list[tuple[tuple, dict]] = []

    def catch(layer, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for s in range(0, len(blocks), batch_size):
            try:  # no KV cache: a cache among the captured kwargs would grow with every replay of a layer
                model(input_ids=blocks[s:s + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    tokens = sum(layer_hidden(a, k).shape[:-1].numel() for a, k in inputs)
    for li, layer in enumerate(layers):
        def run(layer=layer):
            for args, kwargs in inputs:
                layer(*args, **kwargs)

        step(li, layer, run, tokens)
        # the next layer sees this layer's new outputs
        inputs = [with_hidden(args, kwargs, layer_output(layer(*args, **kwargs))) for args, kwargs in inputs]


def input_moments(taps: dict[str, nn.Linear], run, absolute: bool = False) -> tuple[dict, dict]:
    """Call ``run()`` with each of ``taps``' linears (key -> module) watched; per key, the sum over the
    tokens of its input's X^T X (float32, (in, in)) and, with ``absolute``, of |x| per input feature."""
    xtx = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
           for k, m in taps.items()}
    abs_sum = {k: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for k, m in taps.items()} \
        if absolute else {}

    def watch(key):
        def hook(m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            xtx[key].add_(x.t() @ x)
            if absolute:
                abs_sum[key].add_(x.abs().sum(0))
        return hook

    hooks = [m.register_forward_pre_hook(watch(k)) for k, m in taps.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return xtx, abs_sum


def layerwise(model: nn.Module, blocks: torch.Tensor, modules: dict[str, nn.Module], solve, batch_size: int = 8,
              log=print, what: str = "gptq") -> dict[str, float]:
    """``each_layer`` with H = 2 X^T X / tokens of each of the layer's ``modules``' inputs, then
    ``solve(name, module, H)`` (which edits the module and returns a loss)."""
    losses = {}
    n_layers = len(decoder_layers(model))

    def step(li, layer, run, tokens):
        mine = {n: m for n, m in modules.items() if n.startswith(f"model.layers.{li}.")}
        xtx, _ = input_moments(mine, run)
        for name, m in mine.items():
            losses[name] = solve(name, m, 2 * xtx[name] / tokens)
        log(f"{what}: layer {li + 1}/{n_layers}, loss {sum(losses[n] for n in mine):.4g}")

    each_layer(model, blocks, step, batch_size)
    return losses

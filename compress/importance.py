"""Importance of every prunable structure, from activations on calibration blocks (Minitron).

    stats = activation_stats(model, blocks)     # one pass of hooks, + one per layer per block for layer KL

Used by ``compress.pruning.make_plan`` (see there for what each score means) and cached by the
prune stage. ``random_stats`` gives scores of the same form drawn at random (the random-choice
baseline); ``calib_loss``/``log_probs`` score a pruned model against the full one.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from compress.calibration import decoder_layers, layer_hidden, layer_output
from compress.models import head_dim


@torch.no_grad()
def calib_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, reference: list | None = None) -> float:
    """Mean next-token CE over ``blocks`` ((N, T) ids); with ``reference`` (the full model's
    log-probs per batch) the mean KL(reference || model) instead."""
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        x = blocks[start:start + batch_size]
        logp = F.log_softmax(model(input_ids=x).logits.float(), -1)
        if reference is None:
            nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
            total, count = total + nll.sum().item(), count + nll.numel()
        else:
            ref = reference[i]
            total += (ref.exp() * (ref - logp)).sum().item()
            count += x.numel()
    return total / count


@torch.no_grad()
def log_probs(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=blocks[s:s + batch_size]).logits.float(), -1)
            for s in range(0, len(blocks), batch_size)]


@torch.no_grad()
def activation_stats(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, layer_blocks: int | None = None) -> dict:
    """Importance statistics of every prunable structure of ``model`` on ``blocks`` ((N, T) ids);
    layer KL on the first ``layer_blocks`` of them (None: all; 0: none, cosine only)."""
    cfg, layers = model.config, decoder_layers(model)
    H, hd = cfg.num_attention_heads, head_dim(cfg)
    L, d, f = len(layers), cfg.hidden_size, cfg.intermediate_size
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=blocks.device)  # noqa: E731  (sums on the model's device)
    acc = {"heads": z(L, H), "mlp": z(L, f), "hidden": z(d), "layer_cosine": z(L)}
    norms = {name: m for name, m in model.named_modules() if re.search(r"(input_layernorm|post_attention_layernorm|model\.norm)$", name)}
    energy = {name: z(d) for name in norms}
    tokens = [0]
    hooks = []

    def on(module, fn, pre=False):  # hooks must return None (a value would replace the input/output)
        def hook(*args):
            fn(*args)
        hooks.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    for l, layer in enumerate(layers):
        on(layer.self_attn.o_proj, lambda m, a, l=l: acc["heads"][l].add_(
            a[0].float().reshape(-1, H, hd).norm(dim=-1).sum(0).double()), pre=True)
        on(layer.mlp.down_proj, lambda m, a, l=l: acc["mlp"][l].add_(a[0].float().reshape(-1, f).abs().sum(0).double()), pre=True)
        hooks.append(layer.register_forward_hook(lambda m, a, kw, out, l=l: _add_cosine(acc["layer_cosine"], l, a, kw, out),
                                                 with_kwargs=True))
    for name, m in norms.items():
        on(m, lambda mod, a, out: acc["hidden"].add_(out.float().reshape(-1, d).abs().sum(0).double()))
        on(m, lambda mod, a, name=name: energy[name].add_(a[0].float().reshape(-1, d).pow(2).sum(0).double()), pre=True)
    try:
        for start in range(0, len(blocks), batch_size):
            x = blocks[start:start + batch_size]
            model(input_ids=x)
            tokens[0] += x.numel()
    finally:
        for h in hooks:
            h.remove()
    stats = {k: (v / tokens[0]).float().cpu() for k, v in acc.items()}
    stats["norm_energy"] = {k: (v / tokens[0]).float().cpu() for k, v in energy.items()}
    if layer_blocks != 0:
        stats["layer_kl"] = skip_kl(model, blocks[:layer_blocks], batch_size)
    return stats


def _block_io(args, kwargs, out) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_hidden(args, kwargs), layer_output(out)


def _add_cosine(acc: torch.Tensor, l: int, args, kwargs, out) -> None:
    x, y = _block_io(args, kwargs, out)
    acc[l] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().double()


@torch.no_grad()
def skip_kl(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(L,) mean per-token KL(full model || model with block l skipped): what removing l costs."""
    layers = decoder_layers(model)
    kl = torch.zeros(len(layers), dtype=torch.float64)

    def skip(m, args, kwargs, out):  # the block passes its input through unchanged
        x, _ = _block_io(args, kwargs, out)
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
    for start in range(0, len(blocks), batch_size):
        x = blocks[start:start + batch_size]
        ref = F.log_softmax(model(input_ids=x).logits.float(), -1)
        for l, layer in enumerate(layers):
            h = layer.register_forward_hook(skip, with_kwargs=True)
            try:
                logp = F.log_softmax(model(input_ids=x).logits.float(), -1)
            finally:
                h.remove()
            kl[l] += (ref.exp() * (ref - logp)).sum().item()
    return (kl / blocks.numel()).float()


def random_stats(cfg, seed: int) -> dict:
    """Scores of the same form drawn at random: the random-choice baseline of the same shape."""
    g = torch.Generator().manual_seed(seed)
    L, H, f, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    return {"heads": r(L, H), "mlp": r(L, f), "hidden": r(d), "layer_cosine": r(L), "layer_kl": r(L), "norm_energy": {}}

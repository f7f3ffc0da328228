"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Llama-like model becomes a Mixtral-style MoE
whose experts start from its MLPs, plus the router's auxiliary losses and utilization statistics.

Init (``upcycled_state``), per layer with E experts and top-k routing:
    copy   every expert is the dense MLP (optionally times (1 + noise * N(0, 1)), elementwise); the
           router starts N(0, router_std). Mixtral renormalises the top-k weights to sum to 1, so with
           exact copies the MoE equals the dense model whatever the router says.
    split  the MLP's intermediate channels are cut into E parts, one per expert (the dense model's
           parameters in total; k of E parts active per token), with the down projection scaled by E and the router at zero (uniform weights 1/E): with k = E the
           MoE equals the dense model exactly; with k < E it starts as a sum of k of the parts.

Losses the loop adds (``router_losses``), from the router logits of every layer:
    load balancing  Switch Transformer's E * sum_e f_e * P_e (transformers' own function), times
                    ``router_aux_loss_coef``
    router z-loss   mean over tokens of logsumexp(logits)^2 (ST-MoE), times ``router_z_loss_coef``
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from compress.errors import CompressError
from compress.modelio import register_module

ROUTER_Z_LOSS_COEF = "router_z_loss_coef"  # our key in the MoE config (transformers ignores it)


def check_upcycle(cfg, experts: int, top_k: int, init: str) -> None:
    if cfg is None:
        return
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise CompressError(f"upcycling maps a Llama-like MLP (gate/up/down) onto Mixtral; a {cfg.model_type} model "
                            "is not supported")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise CompressError("upcycling to Mixtral needs a model without attention/MLP biases (Mixtral has none)")
    if top_k > experts:
        raise CompressError(f"top_k {top_k} is more than the {experts} experts; use top_k <= experts")
    if init == "split" and cfg.intermediate_size % experts:
        raise CompressError(f"init: split cuts the {cfg.intermediate_size} MLP channels into {experts} experts, which "
                            "does not divide them; use another number of experts or init: copy")


def moe_config(cfg, experts: int, top_k: int, init: str, aux_coef: float, z_coef: float):
    from transformers import MixtralConfig

    from compress.models import head_dim

    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size // experts if init == "split" else cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=head_dim(cfg), hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, output_router_logits=True,
        router_aux_loss_coef=aux_coef, router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        **{ROUTER_Z_LOSS_COEF: z_coef})


def upcycled_state(state: dict[str, torch.Tensor], cfg, experts: int, init: str, noise: float = 0.0,
                   router_std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """The dense state dict mapped onto the MoE's names (experts stacked as Mixtral stores them)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state.items() if ".mlp." not in k}
    f = cfg.intermediate_size
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.mlp."
        gate, up, down = state[p + "gate_proj.weight"], state[p + "up_proj.weight"], state[p + "down_proj.weight"]
        if init == "copy":
            gu = torch.cat([gate, up], 0).expand(experts, -1, -1).clone()  # (E, 2f, hidden)
            dn = down.expand(experts, -1, -1).clone()                       # (E, hidden, f)
            if noise > 0:
                gu = gu * (1 + noise * torch.randn(gu.shape, generator=g)).to(gu.dtype)
                dn = dn * (1 + noise * torch.randn(dn.shape, generator=g)).to(dn.dtype)
            router = torch.randn(experts, cfg.hidden_size, generator=g) * router_std
        else:
            part = f // experts
            gu = torch.stack([torch.cat([gate[e * part:(e + 1) * part], up[e * part:(e + 1) * part]], 0)
                              for e in range(experts)])
            dn = torch.stack([down[:, e * part:(e + 1) * part] * experts for e in range(experts)])
            router = torch.zeros(experts, cfg.hidden_size)
        out[p + "experts.gate_up_proj"] = gu.contiguous()
        out[p + "experts.down_proj"] = dn.contiguous()
        out[p + "gate.weight"] = router.to(gate.dtype)
    return out


def param_counts(cfg) -> dict[str, int]:
    """Non-embedding parameters of the MoE: total, and active per token (attention + router + k experts)."""
    from compress.models import head_dim

    d, hd = cfg.hidden_size, head_dim(cfg)
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * d  # q, o, k, v + 2 norms
    expert = 3 * d * cfg.intermediate_size
    router = cfg.num_local_experts * d
    L = cfg.num_hidden_layers
    return {"total": L * (attn + router + cfg.num_local_experts * expert) + d,
            "active": L * (attn + router + cfg.num_experts_per_tok * expert) + d}


def router_losses(out, config) -> tuple[torch.Tensor | None, dict]:
    """The MoE's auxiliary losses from a forward's router logits (None for a dense model)."""
    logits = getattr(out, "router_logits", None)
    if not logits:
        return None, {}
    total, logs = 0.0, {}
    if getattr(out, "aux_loss", None) is not None and config.router_aux_loss_coef > 0:
        total = total + config.router_aux_loss_coef * out.aux_loss
        logs["load_balance"] = out.aux_loss.detach()
    z_coef = getattr(config, ROUTER_Z_LOSS_COEF, 0.0)
    if z_coef > 0:
        z = torch.stack([torch.logsumexp(x.float(), -1).pow(2).mean() for x in logits]).mean()
        total = total + z_coef * z
        logs["router_z"] = z.detach()
    return total, logs


@torch.no_grad()
def utilization(model, blocks: torch.Tensor, batch_size: int = 8) -> list[list[float]]:
    """Per layer, the fraction of (token, slot) routings each expert receives on ``blocks``."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.float64)
    for s in range(0, len(blocks), batch_size):
        out = model(input_ids=blocks[s:s + batch_size], output_router_logits=True)
        for l, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, -1).indices.reshape(-1)
            counts[l] += torch.bincount(top.cpu(), minlength=cfg.num_local_experts).double()
    return (counts / counts.sum(1, keepdim=True)).tolist()


def capacity_keep(indices: torch.Tensor, scores: torch.Tensor, experts: int, capacity_factor: float) -> torch.Tensor:
    """Which (token, slot) routings fit their expert's capacity C = ceil(factor * tokens * k / E),
    (tokens, k) bool. Batch-prioritized (Riquelme et al. 2021): an expert takes its routings in
    decreasing router weight, so a token's weaker choices are dropped first."""
    n, k = indices.shape
    cap = math.ceil(capacity_factor * n * k / experts)
    order = torch.argsort(scores.detach().reshape(-1), descending=True, stable=True)
    onehot = torch.nn.functional.one_hot(indices.reshape(-1)[order], experts)  # (n k, E) in priority order
    rank = torch.empty(n * k, dtype=torch.long, device=indices.device)
    rank[order] = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # position in its expert's queue
    return (rank < cap).reshape(n, k)


@register_module
class CapacityRouter(MixtralTopKRouter):
    """Mixtral's top-k router that, while training, drops the routings beyond each expert's
    capacity (their weight becomes 0: the token keeps its other experts and the residual).
    Inference (and the export, a stock router) is dropless."""

    def __init__(self, experts: int, hidden: int, top_k: int, capacity_factor: float):
        super().__init__(_router_config(experts, hidden, top_k))
        self.capacity_factor = capacity_factor
        self.dropped = None  # fraction of routings dropped in the last training forward

    def forward(self, hidden_states):
        logits, scores, indices = super().forward(hidden_states)
        if self.training:
            keep = capacity_keep(indices, scores, self.num_experts, self.capacity_factor)
            scores = scores * keep.to(scores.dtype)
            self.dropped = 1.0 - keep.float().mean().detach()
        return logits, scores, indices

    def spec(self) -> dict:
        return {"experts": self.num_experts, "hidden": self.hidden_dim, "top_k": self.top_k,
                "capacity_factor": self.capacity_factor}

    @classmethod
    def from_spec(cls, spec: dict) -> "CapacityRouter":
        return cls(**spec)

    def materialize(self) -> nn.Module:
        plain = MixtralTopKRouter(_router_config(self.num_experts, self.hidden_dim, self.top_k))
        plain.weight = self.weight
        return plain


def _router_config(experts: int, hidden: int, top_k: int) -> SimpleNamespace:
    return SimpleNamespace(num_experts_per_tok=top_k, num_local_experts=experts, hidden_size=hidden)


def with_capacity(model: nn.Module, capacity_factor: float) -> nn.Module:
    """Swap every Mixtral router of ``model`` for a ``CapacityRouter`` (same weight)."""
    for name, m in list(model.named_modules()):
        if type(m) is MixtralTopKRouter:
            r = CapacityRouter(m.num_experts, m.hidden_dim, m.top_k, capacity_factor).to(m.weight.device, m.weight.dtype)
            r.weight = m.weight
            model.set_submodule(name, r.train(m.training))
    return model


def dropped_fraction(model: nn.Module) -> torch.Tensor | None:
    """The mean fraction of routings the capacity routers dropped in the last training forward."""
    got = [m.dropped for m in model.modules() if getattr(m, "dropped", None) is not None]
    return torch.stack(got).mean() if got else None


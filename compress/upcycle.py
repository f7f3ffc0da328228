"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Llama-like model becomes a Mixtral-style MoE
whose experts start from its MLPs, plus the router's auxiliary losses and utilization statistics.

Architecture: every layer upcycled, no shared expert -> ``MixtralForCausalLM``. Only some layers
(``layers``; the others keep their dense MLP) or a shared expert -> ``Qwen2MoeForCausalLM``
(``mlp_only_layers``; ``qkv_bias`` off, top-k weights renormalised as Mixtral's), with a shared
expert of width 0 when none is asked for (transformers and vLLM then skip it).

Init (``upcycled_state``), per layer with E experts and top-k routing:
    copy   every expert is the dense MLP (optionally times (1 + noise * N(0, 1)), elementwise); the
           router starts N(0, router_std). Mixtral renormalises the top-k weights to sum to 1, so with
           exact copies the MoE equals the dense model whatever the router says.
    split  the MLP's intermediate channels are cut into E parts, one per expert (the dense model's
           parameters in total; k of E parts active per token), with the down projection scaled by E and the router at zero (uniform weights 1/E): with k = E the
           MoE equals the dense model exactly; with k < E it starts as a sum of k of the parts.
    shared (Qwen2-MoE) a shared expert, the dense MLP itself, beside the routed ones; its sigmoid
           gate starts at zero (a weight of 1/2) and the routed experts' down projections are
           halved, so the layer still starts as the dense MLP (exactly, as above).

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
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from compress.errors import CompressError
from compress.modelio import register_module

ROUTER_Z_LOSS_COEF = "router_z_loss_coef"  # our key in the MoE config (transformers ignores it)


def moe_layers(cfg) -> list[int]:
    """The layers of an MoE config that hold experts (Mixtral: all; Qwen2-MoE: not ``mlp_only_layers``)."""
    if cfg.model_type == "mixtral":
        return list(range(cfg.num_hidden_layers))
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [l for l in range(cfg.num_hidden_layers) if l not in cfg.mlp_only_layers and (l + 1) % step == 0]


def num_experts(cfg) -> int:
    return cfg.num_local_experts if cfg.model_type == "mixtral" else cfg.num_experts


def check_upcycle(cfg, experts: int, top_k: int, init: str, layers: list[int] | None = None) -> None:
    if cfg is None:
        return
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise CompressError(f"upcycling maps a Llama-like MLP (gate/up/down) onto Mixtral; a {cfg.model_type} model "
                            "is not supported")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise CompressError("upcycling to Mixtral needs a model without attention/MLP biases (Mixtral has none)")
    if layers is not None and (bad := [l for l in layers if l >= cfg.num_hidden_layers]):
        raise CompressError(f"upcycle.layers has {bad} but the model has {cfg.num_hidden_layers} layers "
                            f"(0..{cfg.num_hidden_layers - 1}); fix the indices")
    if top_k > experts:
        raise CompressError(f"top_k {top_k} is more than the {experts} experts; use top_k <= experts")
    if init == "split" and cfg.intermediate_size % experts:
        raise CompressError(f"init: split cuts the {cfg.intermediate_size} MLP channels into {experts} experts, which "
                            "does not divide them; use another number of experts or init: copy")


def moe_config(cfg, experts: int, top_k: int, init: str, aux_coef: float, z_coef: float,
               layers: list[int] | None = None, shared_expert: bool = False):
    """The MoE's config: Mixtral when every layer is upcycled without a shared expert, else Qwen2-MoE."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    from compress.models import head_dim

    every = list(range(cfg.num_hidden_layers))
    routed = cfg.intermediate_size // experts if init == "split" else cfg.intermediate_size
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim(cfg), hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings, num_experts_per_tok=top_k, output_router_logits=True,
        router_aux_loss_coef=aux_coef, attention_dropout=0.0, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, **{ROUTER_Z_LOSS_COEF: z_coef})
    if shared_expert or (layers is not None and set(layers) != set(every)):
        return Qwen2MoeConfig(
            **common, intermediate_size=cfg.intermediate_size, moe_intermediate_size=routed,
            shared_expert_intermediate_size=cfg.intermediate_size if shared_expert else 0, num_experts=experts,
            norm_topk_prob=True, decoder_sparse_step=1, qkv_bias=False, use_sliding_window=False,
            mlp_only_layers=[l for l in every if layers is not None and l not in layers])
    return MixtralConfig(**common, intermediate_size=routed, num_local_experts=experts, router_jitter_noise=0.0,
                         sliding_window=None)


def upcycled_state(state: dict[str, torch.Tensor], cfg, experts: int, init: str, noise: float = 0.0,
                   router_std: float = 0.02, seed: int = 0, layers: list[int] | None = None,
                   shared_expert: bool | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict mapped onto the MoE's names (experts stacked as Mixtral and Qwen2-MoE
    hold them in memory). ``layers`` (default all) are upcycled, the others keep their MLP;
    ``shared_expert`` None: the Mixtral layout; True / False: Qwen2-MoE's, with or without one."""
    g = torch.Generator().manual_seed(seed)
    layers = set(range(cfg.num_hidden_layers) if layers is None else layers)
    out = {k: v for k, v in state.items() if ".mlp." not in k or int(k.split(".")[2]) not in layers}
    f = cfg.intermediate_size
    for l in sorted(layers):
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
        if shared_expert is not None:  # Qwen2-MoE: output = routed + sigmoid(shared gate) * shared
            width = f if shared_expert else 0
            out[p + "shared_expert.gate_proj.weight"] = gate[:width].clone()
            out[p + "shared_expert.up_proj.weight"] = up[:width].clone()
            out[p + "shared_expert.down_proj.weight"] = down[:, :width].clone()
            out[p + "shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size, dtype=gate.dtype)  # sigmoid: 1/2
            if shared_expert:
                dn = dn / 2  # routed (weights summing to 1) / 2 + dense / 2 = dense
        out[p + "experts.gate_up_proj"] = gu.contiguous()
        out[p + "experts.down_proj"] = dn.contiguous()
        out[p + "gate.weight"] = router.to(gate.dtype)
    return out


def param_counts(cfg) -> dict[str, int]:
    """Non-embedding parameters of the MoE: total, and active per token (attention + router + k
    experts + the shared expert and its gate; a dense layer's whole MLP)."""
    from compress.models import head_dim

    d, hd, E = cfg.hidden_size, head_dim(cfg), num_experts(cfg)
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * d  # q, o, k, v + 2 norms
    qwen = cfg.model_type != "mixtral"
    expert = 3 * d * (cfg.moe_intermediate_size if qwen else cfg.intermediate_size)
    shared = 3 * d * cfg.shared_expert_intermediate_size + d if qwen else 0  # + its sigmoid gate
    n_moe = len(moe_layers(cfg))
    dense = (cfg.num_hidden_layers - n_moe) * (attn + 3 * d * cfg.intermediate_size)
    return {"total": n_moe * (attn + E * d + E * expert + shared) + dense + d,
            "active": n_moe * (attn + E * d + cfg.num_experts_per_tok * expert + shared) + dense + d}


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
    """Per MoE layer (``moe_layers``, in order), the fraction of (token, slot) routings each expert receives on ``blocks``."""
    cfg = model.config
    counts = torch.zeros(len(moe_layers(cfg)), num_experts(cfg), dtype=torch.float64)
    for s in range(0, len(blocks), batch_size):
        out = model(input_ids=blocks[s:s + batch_size], output_router_logits=True)
        assert len(out.router_logits) == len(counts), "one router output per MoE layer"
        for l, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, -1).indices.reshape(-1)
            counts[l] += torch.bincount(top.cpu(), minlength=num_experts(cfg)).double()
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


class _Capacity:
    """A stock top-k router that, while training, drops the routings beyond each expert's capacity
    (their weight becomes 0: the token keeps its other experts and the residual). Inference (and
    the export, the stock router again) is dropless. Subclasses name the stock router they extend
    (``STOCK``): the models record router outputs by that class."""

    STOCK: type[nn.Module]

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
    def from_spec(cls, spec: dict):
        return cls(**spec)

    def materialize(self) -> nn.Module:
        plain = self.STOCK(_router_config(self.num_experts, self.hidden_dim, self.top_k))
        plain.weight = self.weight
        return plain


@register_module
class CapacityRouter(_Capacity, MixtralTopKRouter):
    """Mixtral's router with a training-time capacity (``_Capacity``)."""

    STOCK = MixtralTopKRouter


@register_module
class Qwen2CapacityRouter(_Capacity, Qwen2MoeTopKRouter):
    """Qwen2-MoE's router (top-k renormalised, as upcycling sets it) with a training-time capacity."""

    STOCK = Qwen2MoeTopKRouter


def _router_config(experts: int, hidden: int, top_k: int) -> SimpleNamespace:
    # both stock routers' fields; Qwen2-MoE's renormalises its top-k as Mixtral's does
    return SimpleNamespace(num_experts_per_tok=top_k, num_local_experts=experts, num_experts=experts,
                           hidden_size=hidden, norm_topk_prob=True)


def with_capacity(model: nn.Module, capacity_factor: float) -> nn.Module:
    """Swap every Mixtral or Qwen2-MoE router of ``model`` for its capacity router (same weight)."""
    capped = {c.STOCK: c for c in (CapacityRouter, Qwen2CapacityRouter)}
    for name, m in list(model.named_modules()):
        if type(m) in capped:
            assert getattr(m, "norm_topk_prob", True), "upcycled Qwen2-MoE routers renormalise their top-k"
            r = capped[type(m)](m.num_experts, m.hidden_dim, m.top_k, capacity_factor).to(m.weight.device, m.weight.dtype)
            r.weight = m.weight
            model.set_submodule(name, r.train(m.training))
    return model


def dropped_fraction(model: nn.Module) -> torch.Tensor | None:
    """The mean fraction of routings the capacity routers dropped in the last training forward."""
    got = [m.dropped for m in model.modules() if getattr(m, "dropped", None) is not None]
    return torch.stack(got).mean() if got else None


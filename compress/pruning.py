"""The math of structured pruning (Minitron-style), apart from its stage (``compress.methods.prune``).

    stats = activation_stats(model, blocks)                  # compress.importance
    plan = make_plan(model.config, shape, stats, layer_score="kl")
    small = apply_plan(model, plan)                          # a stock HF model of the smaller shape

Importance (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"), all from activations on calibration blocks, on the unpruned model:
  * attention head h of layer l: mean over tokens of ||o_h||_2, o_h the head's slice of o_proj's input;
    a KV group scores the sum of its query heads. Kept: the best KV groups, then the best query
    heads inside each kept group, the same number per group (HF's GQA maps query head h to KV
    head h // (H / KV)).
  * MLP channel c of layer l: mean |act(gate(x)) * up(x)|_c (down_proj's input).
  * hidden channel c: sum over every RMSNorm of mean |norm(x)|_c; one set of channels for the
    embeddings, every norm, every projection and the (tied) head.
  * layer l: ``kl`` = mean per-token KL(full model || the model with block l skipped) on the
    calibration blocks, or ``cosine`` = mean over tokens of 1 - cos(block input, block output)
    (ShortGPT's block influence; one pass instead of L+1).
Removing hidden channels shrinks the RMS every norm divides by; each norm's weight is rescaled by
sqrt(E_kept / E_all * d / d') from the measured second moments of its input, which keeps outputs
exactly where the removed channels are zero.

Supported: decoder-only models laid out like Llama (``SUPPORTED``): q/k/v/o, gate/up/down,
RMSNorm before attention and MLP, optionally biased projections (Qwen2).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compress.errors import CompressError
from compress.models import head_dim

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def shape_of(cfg) -> dict[str, int]:
    return {k: int(getattr(cfg, k)) for k in SHAPE_KEYS}


def check_shape(cfg, target: dict[str, int]) -> None:
    """Raise unless ``target`` (a full shape) can be cut out of a model of config ``cfg``."""
    if cfg.model_type not in SUPPORTED:
        raise CompressError(f"structured pruning supports {', '.join(SUPPORTED)} models, not {cfg.model_type!r}; "
                            "use student.init=drop_layers for depth only")
    old = shape_of(cfg)
    for key, value in target.items():
        if value < 1:
            raise CompressError(f"prune.{key}={value}: keep at least 1")
        if value > old[key]:
            raise CompressError(f"prune.{key}={value} is more than the model has ({old[key]}); pruning only removes")
    h, kv, d = target["num_attention_heads"], target["num_key_value_heads"], target["hidden_size"]
    if h % kv:
        raise CompressError(f"prune: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}; "
                            "GQA needs the same number of query heads per KV head")
    if h // kv > old["num_attention_heads"] // old["num_key_value_heads"]:
        raise CompressError(f"prune: {h} query heads over {kv} KV heads is {h // kv} per group, but the model's groups "
                            f"have {old['num_attention_heads'] // old['num_key_value_heads']}; keep more KV heads "
                            f"(e.g. num_key_value_heads={math.ceil(h / (old['num_attention_heads'] // old['num_key_value_heads']))})")
    if d % h:
        raise CompressError(f"prune: hidden_size {d} is not a multiple of num_attention_heads {h}, which transformers' "
                            f"config refuses; use a multiple of {h} (e.g. {max(h, d // h * h)} or {(d // h + 1) * h})")


# ---------------------------------------------------------------- parameter counts

def layer_params(d: int, heads: int, kv: int, hd: int, f: int, qkv_bias: bool = False, o_bias: bool = False,
                 mlp_bias: bool = False) -> int:
    attn = d * heads * hd * 2 + d * kv * hd * 2
    attn += (heads * hd + 2 * kv * hd if qkv_bias else 0) + (d if o_bias else 0)
    mlp = 3 * d * f + ((2 * f + d) if mlp_bias else 0)
    return attn + mlp + 2 * d  # two norms


def non_embedding_params(cfg, shape: dict[str, int] | None = None) -> int:
    """Parameters outside the token embedding and LM head, for ``cfg`` cut to ``shape``."""
    s = {**shape_of(cfg), **(shape or {})}
    per = layer_params(s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], head_dim(cfg),
                       s["intermediate_size"], qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
                       o_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)))
    extra = 2 * head_dim(cfg) if cfg.model_type == "qwen3" else 0  # q_norm, k_norm
    return s["num_hidden_layers"] * (per + extra) + s["hidden_size"]  # + the final norm


def candidate_shapes(cfg, fraction: float, *, tolerance: float = 0.02, hidden_multiple: int = 64,
                     mlp_multiple: int = 32, min_depth: float = 0.5, min_width: float = 0.5) -> list[dict[str, int]]:
    """Shapes with non-embedding parameters within ``tolerance`` of ``fraction`` of the model's.

    Axes: depth, hidden width, attention heads (valid GQA cuts); the MLP width is then solved for
    the budget. ``min_depth``/``min_width`` bound how far any one axis is cut.
    """
    old = shape_of(cfg)
    target = fraction * non_embedding_params(cfg)
    groups = old["num_attention_heads"] // old["num_key_value_heads"]
    head_opts = sorted({(kv * g, kv) for kv in range(1, old["num_key_value_heads"] + 1) for g in range(1, groups + 1)
                        if kv * g >= min_width * old["num_attention_heads"]}, reverse=True)
    d0, L0, f0 = old["hidden_size"], old["num_hidden_layers"], old["intermediate_size"]
    grid = sorted({d0} | set(range(hidden_multiple, d0, hidden_multiple)), reverse=True)

    def hiddens(h: int) -> list[int]:  # grid points moved to a multiple of the head count (and of 8)
        step = math.lcm(h, 8)
        return sorted({d for d in (round(x / step) * step for x in grid) if min_width * d0 <= d <= d0}, reverse=True)

    out = []
    for L in range(L0, max(1, math.ceil(min_depth * L0)) - 1, -1):
        for h, kv in head_opts:
            for d in hiddens(h):
                base = {"num_hidden_layers": L, "hidden_size": d, "num_attention_heads": h, "num_key_value_heads": kv}
                fixed = non_embedding_params(cfg, {**base, "intermediate_size": 0})
                per_f = (non_embedding_params(cfg, {**base, "intermediate_size": mlp_multiple}) - fixed) / mlp_multiple
                f = round((target - fixed) / per_f / mlp_multiple) * mlp_multiple if per_f > 0 else 0
                if not (min_width * f0 <= f <= f0):
                    continue
                shape = {**base, "intermediate_size": int(f)}
                if abs(non_embedding_params(cfg, shape) / target - 1) <= tolerance:
                    out.append(shape)
    return out


def spread(items: list, n: int) -> list:
    """At most ``n`` items, evenly spaced through the list (first and last kept)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


# ---------------------------------------------------------------- the plan: which structures stay

@dataclass
class PrunePlan:
    """Indices kept, in the unpruned model's numbering (sorted)."""

    layers: list[int]
    hidden: list[int]
    mlp: list[list[int]]  # per original layer
    kv_heads: list[list[int]]  # per original layer
    q_heads: list[list[int]]  # per original layer, grouped by kept KV head
    norm_scale: dict[str, float] = field(default_factory=dict)  # per norm module name

    def to_dict(self) -> dict:
        return asdict(self)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.float(), k).indices.tolist())


def select_heads(scores: torch.Tensor, n_kv: int, heads: int, kv: int) -> tuple[list[int], list[int]]:
    """(kept KV heads, kept query heads) of one layer: best groups, then the best heads in each."""
    H = scores.numel()
    g_old, g_new = H // n_kv, heads // kv
    groups = scores.reshape(n_kv, g_old)
    keep_kv = _top(groups.sum(1), kv)
    keep_q = [j * g_old + i for j in keep_kv for i in _top(groups[j], g_new)]
    return keep_kv, keep_q


def make_plan(cfg, shape: dict[str, int], stats: dict, layer_score: str = "kl") -> PrunePlan:
    """Which structures a model of ``cfg`` keeps to reach ``shape``, by the scores in ``stats``."""
    old = shape_of(cfg)
    L = old["num_hidden_layers"]
    score = stats["layer_kl" if layer_score == "kl" else "layer_cosine"]
    layers = _top(score, shape["num_hidden_layers"])
    hidden = _top(stats["hidden"], shape["hidden_size"])
    mlp = [_top(stats["mlp"][l], shape["intermediate_size"]) for l in range(L)]
    heads = [select_heads(stats["heads"][l], old["num_key_value_heads"], shape["num_attention_heads"],
                          shape["num_key_value_heads"]) for l in range(L)]
    scale = {}
    d, d2 = old["hidden_size"], shape["hidden_size"]
    if d2 < d:
        for name, e in stats.get("norm_energy", {}).items():
            kept, total = float(e[hidden].sum()), float(e.sum())
            scale[name] = math.sqrt((kept / d2) / (total / d)) if total > 0 and kept > 0 else math.sqrt(d / d2)
    return PrunePlan(layers, hidden, mlp, [h[0] for h in heads], [h[1] for h in heads], scale)


# ---------------------------------------------------------------- applying a plan to weights

def _index(w: torch.Tensor, idx: list[int], block: int) -> torch.Tensor:
    return torch.tensor([i * block + j for i in idx for j in range(block)], dtype=torch.long, device=w.device)


def _rows(w: torch.Tensor, idx: list[int], block: int = 1) -> torch.Tensor:
    return w.index_select(0, _index(w, idx, block))


def _cols(w: torch.Tensor, idx: list[int], block: int = 1) -> torch.Tensor:
    return w.index_select(1, _index(w, idx, block))


def slice_state(state: dict[str, torch.Tensor], cfg, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The state dict of the pruned model (keys renumbered to the kept layers)."""
    hd, new = head_dim(cfg), {}
    renumber = {old: i for i, old in enumerate(plan.layers)}
    hid = plan.hidden if len(plan.hidden) < cfg.hidden_size else None
    for key, t in state.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", key)
        if m is None:
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                t = _cols(t, hid) if hid else t
            elif key == "model.norm.weight":
                t = (t[_index(t, hid, 1)] * plan.norm_scale.get("model.norm", math.sqrt(cfg.hidden_size / len(hid)))) if hid else t
            elif t.ndim and cfg.hidden_size in t.shape:
                raise CompressError(f"structured pruning does not know the tensor {key!r} {tuple(t.shape)}; this "
                                    f"architecture is not supported (use {', '.join(SUPPORTED)})")
            new[key] = t
            continue
        l, rest = int(m.group(1)), m.group(2)
        if l not in renumber:
            continue
        kv, q, ch = plan.kv_heads[l], plan.q_heads[l], plan.mlp[l]
        if rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            t = _rows(t, q, hd)
        elif re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", rest):
            t = _rows(t, kv, hd)
        elif rest == "self_attn.o_proj.weight":
            t = _cols(t, q, hd)
        elif re.fullmatch(r"mlp\.(gate|up)_proj\.(weight|bias)", rest):
            t = _rows(t, ch)
        elif rest == "mlp.down_proj.weight":
            t = _cols(t, ch)
        if hid:  # the residual stream's channels: inputs of q/k/v/gate/up, outputs of o/down, norms
            if re.fullmatch(r"(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight", rest):
                t = _cols(t, hid)
            elif re.fullmatch(r"(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)", rest):
                t = _rows(t, hid)
            elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                name = f"model.layers.{l}.{rest[:-len('.weight')]}"
                t = t[_index(t, hid, 1)] * plan.norm_scale.get(name, math.sqrt(cfg.hidden_size / len(hid)))
        new[f"model.layers.{renumber[l]}.{rest}"] = t
    return new


def pruned_config(cfg, shape: dict[str, int]):
    import copy

    new = copy.deepcopy(cfg)
    new.head_dim = head_dim(cfg)  # stays; make it explicit now that hidden/heads no longer imply it
    for key, value in shape.items():
        setattr(new, key, int(value))
    if getattr(new, "layer_types", None):
        new.layer_types = new.layer_types[: shape["num_hidden_layers"]]
    return new


def shape_of_plan(plan: PrunePlan) -> dict[str, int]:
    l0 = plan.layers[0]
    return {"num_hidden_layers": len(plan.layers), "hidden_size": len(plan.hidden),
            "intermediate_size": len(plan.mlp[l0]), "num_attention_heads": len(plan.q_heads[l0]),
            "num_key_value_heads": len(plan.kv_heads[l0])}


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new stock model of the pruned shape holding the kept weights (``model`` is untouched)."""
    from transformers import AutoModelForCausalLM

    cfg = pruned_config(model.config, shape_of_plan(plan))
    state = slice_state({k: v.detach() for k, v in model.state_dict().items()}, model.config, plan)
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = small.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    assert not unexpected and set(missing) <= tied, f"pruned state does not fit: {missing} {unexpected}"
    small.config.use_cache = False
    return small.to(next(model.parameters()).device)

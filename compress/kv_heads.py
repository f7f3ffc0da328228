"""Merging key/value heads (MHA -> GQA, or GQA -> fewer groups): the math of the ``gqa`` stage.

Old KV heads are merged in consecutive groups of r = H_kv_old / H_kv_new (the query heads that
used them then share the merged head; the query-to-group mapping stays as HF lays it out).

    mean      W_k' = mean of the group's W_k,   W_v' likewise        (Ainslie et al. 2023)
    weighted  output-preserving weighted means:
              K: what a key meets is q . k, so the merge that keeps the group's scores best weights
                 each old head h by the energy its own queries put on each dimension: per RoPE pair
                 p (dims j and j + d/2, a pair RoPE rotates together, so its energy is position-
                 invariant), c_h[p] = E[q_j^2 + q_{j+d/2}^2] summed over the query heads using h, on
                 calibration text, and W_k'[p] = sum_h c_h[p] W_k,h[p] / sum_h c_h[p]. It minimises
                 sum_h E[(q_h . (k_h - k'))^2] when the query dimensions are uncorrelated.
              V: what a value becomes is W_o v, so with D_h = sum over the query heads i using h of
                 W_o,i^T W_o,i (d x d), W_v' = (sum_h D_h)^-1 sum_h D_h W_v,h: the least-squares merge
                 of the output each query head writes (weights only, no data).
Both reproduce the original exactly when a group's heads are identical (tested).
"""

from __future__ import annotations

import torch

from compress.errors import CompressError


def check_kv_heads(heads: int, kv_old: int, kv_new: int) -> None:
    if kv_new < 1 or kv_old % kv_new or heads % kv_new:
        fits = [n for n in range(1, kv_old) if kv_old % n == 0 and heads % n == 0]
        raise CompressError(f"num_key_value_heads {kv_new} must divide the model's {kv_old} KV heads (and its {heads} "
                            f"query heads); use {' or '.join(map(str, fits)) if fits else 'another model'}")
    if kv_new == kv_old:
        raise CompressError(f"num_key_value_heads {kv_new} is what the model has already; use fewer")


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """(n * d, ...) -> (n, d, ...)"""
    return w.reshape(n, w.shape[0] // n, *w.shape[1:])


def merge_mean(w: torch.Tensor, kv_old: int, kv_new: int) -> torch.Tensor:
    """A k/v projection weight (kv_old * d, hidden) or bias (kv_old * d,) -> (kv_new * d, ...)."""
    h = _heads(w.float(), kv_old)
    return h.reshape(kv_new, kv_old // kv_new, *h.shape[1:]).mean(1).reshape(-1, *w.shape[1:]).to(w.dtype)


def merge_k_weighted(w: torch.Tensor, energy: torch.Tensor, kv_old: int, kv_new: int) -> torch.Tensor:
    """K merge with per-(head, RoPE pair) weights ``energy`` (kv_old, d / 2)."""
    h = _heads(w.float(), kv_old)                      # (kv_old, d, ...)
    c = torch.cat([energy, energy], 1).float()         # (kv_old, d): pair p weights dims p and p + d/2
    c = c.reshape(kv_new, kv_old // kv_new, -1).clamp_min(1e-12)
    c = c.reshape(*c.shape, *([1] * (h.dim() - 2)))
    g = h.reshape(kv_new, kv_old // kv_new, *h.shape[1:])
    return ((c * g).sum(1) / c.sum(1)).reshape(-1, *w.shape[1:]).to(w.dtype)


def merge_v_weighted(w: torch.Tensor, o_proj: torch.Tensor, heads: int, kv_old: int, kv_new: int,
                     ridge: float = 1e-6) -> torch.Tensor:
    """V merge (least squares on each query head's output through ``o_proj`` (hidden, heads * d))."""
    d = w.shape[0] // kv_old
    wo = o_proj.float().reshape(o_proj.shape[0], heads, d).permute(1, 0, 2)  # (heads, hidden, d)
    per_kv = heads // kv_old
    D = torch.einsum("ihd,ihe->ide", wo, wo).reshape(kv_old, per_kv, d, d).sum(1)  # (kv_old, d, d)
    D = D.reshape(kv_new, kv_old // kv_new, d, d)
    h = _heads(w.float(), kv_old)
    g = h.reshape(kv_new, kv_old // kv_new, d, -1) if w.dim() == 2 else h.reshape(kv_new, kv_old // kv_new, d, 1)
    lhs = D.sum(1) + ridge * torch.eye(d) * D.sum(1).diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    rhs = torch.einsum("grde,gref->gdf", D, g)
    merged = torch.linalg.solve(lhs, rhs)  # (kv_new, d, cols)
    return merged.reshape(-1, *w.shape[1:]).to(w.dtype)


def merge_state(state: dict[str, torch.Tensor], cfg, kv_new: int, method: str,
                energy: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every layer's k/v projections merged to ``kv_new`` heads."""
    out = dict(state)
    heads, kv_old = cfg.num_attention_heads, cfg.num_key_value_heads
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.self_attn."
        for kind in ("k", "v"):
            for suffix in ("weight", "bias"):
                key = f"{p}{kind}_proj.{suffix}"
                if key not in state:
                    continue
                w = state[key]
                if method == "mean":
                    out[key] = merge_mean(w, kv_old, kv_new)
                elif kind == "k":
                    out[key] = merge_k_weighted(w, energy[l], kv_old, kv_new)
                else:
                    out[key] = merge_v_weighted(w, state[f"{p}o_proj.weight"], heads, kv_old, kv_new)
    return out


def kv_bytes_per_token(cfg, bytes_per_value: int = 2) -> int:
    from compress.models import head_dim

    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * bytes_per_value

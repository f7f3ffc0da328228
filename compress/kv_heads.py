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
                w = state[key].detach().cpu()  # the statistics live on the CPU; a layer's weights are small
                if method == "mean":
                    merged = merge_mean(w, kv_old, kv_new)
                elif kind == "k":
                    merged = merge_k_weighted(w, energy[l].cpu(), kv_old, kv_new)
                else:
                    merged = merge_v_weighted(w, state[f"{p}o_proj.weight"].detach().cpu(), heads, kv_old, kv_new)
                out[key] = merged.to(state[key].device)
    return out


def kv_bytes_per_token(cfg, bytes_per_value: int = 2) -> int:
    from compress.models import head_dim

    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * bytes_per_value


# --- pca: a low-rank merge of each group's keys and values, compensated in the queries and in o_proj ---
#
# RoPE rotates dims (j, j + d/2) of every head together by the same angle: read that pair as a complex
# number z_j = x_j + i x_{j+d/2}, and RoPE multiplies it by e^{i theta_j n}. Multiplying z_j by any complex
# constant commutes with that rotation, so per pair j the group's r keys z_{h,j} can be replaced by one
# merged key z'_j = sum_h e_{h,j} z_{h,j}, each old key read back as z_{h,j} ~ c_{h,j} z'_j, and a query
# head that used h scores the same as before with its query pair multiplied by conj(c_{h,j}): rank one per
# pair, exact when the heads agree up to a complex factor, and foldable into q_proj and k_proj. e and c are
# the top eigenvector of the query-energy-weighted covariance E[z z^H] over calibration text: the merge
# that keeps sum_h (query energy of h) E|z_h - c_h z'|^2 smallest.
# Values have no RoPE: v' = P v_group (d of the group's r d dims), and each query head's o_proj columns
# read its old head back through B (v_h ~ B_h v'). P is PCA in the metric each head's output sees
# (blockdiag of W_o,i^T W_o,i), B the least-squares decoder E[v v'^T] E[v' v'^T]^-1.


def rope_pair_scale(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One head's projection rows (d, ...) or bias (d,) with each RoPE pair z_j times the complex c_j (d/2,)."""
    half = w.shape[0] // 2
    c = c.reshape(half, *([1] * (w.dim() - 1)))
    w1, w2 = w[:half].double(), w[half:].double()
    return torch.cat([c.real * w1 - c.imag * w2, c.imag * w1 + c.real * w2])


def pca_key_codes(energy: torch.Tensor, kcov: torch.Tensor, kv_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder e and decoder c, each (kv_old, d/2) complex, of the per-pair rank-one key merge.

    ``energy`` (kv_old, d/2): the query energy on each old head's pairs; ``kcov`` (d/2, kv_old, kv_old):
    E[z z^H] of the keys' pairs. The merged key of group g is sum_{h in g} e_h z_h; z_h ~ c_h z'."""
    kv_old, half = energy.shape
    r = kv_old // kv_new
    enc = torch.zeros(kv_old, half, dtype=torch.complex128)
    dec = torch.zeros_like(enc)
    for g in range(kv_new):
        hs = slice(g * r, (g + 1) * r)
        s = energy[hs].double().T.clamp_min(1e-30).sqrt()               # (half, r)
        C = kcov[:, hs, hs].to(torch.complex128)                       # (half, r, r)
        vals, vecs = torch.linalg.eigh(s[:, :, None] * C * s[:, None, :])
        u = vecs[..., -1]                                              # (half, r), unit, top eigenvalue
        lead = u.gather(1, u.abs().argmax(1, keepdim=True))            # a deterministic phase: lead entry real > 0
        u = u * (lead.conj() / lead.abs().clamp_min(1e-30))
        # scale z' to the group's mean key energy (E|z'|^2 = top eigenvalue before scaling)
        alpha = (C.diagonal(dim1=1, dim2=2).real.mean(1) / vals[:, -1].clamp_min(1e-30)).sqrt()[:, None]
        enc[hs] = (u.conj() * s * alpha).T
        dec[hs] = (u / s / alpha).T
    return enc, dec


def merge_qk_pca(wq: torch.Tensor, wk: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor, heads: int,
                 kv_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj (heads d, ...) and k_proj (kv_old d, ...) weights or biases -> (q', k' (kv_new d, ...))."""
    kv_old = enc.shape[0]
    r, per = kv_old // kv_new, heads // kv_old
    K, Q = _heads(wk, kv_old), _heads(wq, heads)
    k_new = torch.stack([sum(rope_pair_scale(K[h], enc[h]) for h in range(g * r, (g + 1) * r))
                         for g in range(kv_new)])
    q_new = torch.stack([rope_pair_scale(Q[i], dec[i // per].conj()) for i in range(heads)])
    return (q_new.reshape(wq.shape).to(wq.dtype), k_new.reshape(-1, *wk.shape[1:]).to(wk.dtype))


def pca_value_codes(o_proj: torch.Tensor, vcov: torch.Tensor, heads: int, kv_old: int,
                    ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """P (kv_new, d, r d) and B (kv_new, r d, d) of the value merge; ``vcov`` (kv_new, r d, r d) is E[v v^T]
    of each group's stacked old value heads on calibration text."""
    kv_new, rd, _ = vcov.shape
    d, r = rd * kv_new // kv_old, kv_old // kv_new
    wo = o_proj.double().reshape(o_proj.shape[0], heads, d).permute(1, 0, 2)       # (heads, hidden, d)
    D = torch.einsum("ihd,ihe->ide", wo, wo).reshape(kv_old, heads // kv_old, d, d).sum(1)
    P, B = torch.zeros(kv_new, d, rd, dtype=torch.float64), torch.zeros(kv_new, rd, d, dtype=torch.float64)
    for g in range(kv_new):
        M = torch.block_diag(*D[g * r:(g + 1) * r])
        ev, Ev = torch.linalg.eigh(M)
        Mh = Ev @ torch.diag(ev.clamp_min(ev.max() * 1e-12).sqrt()) @ Ev.T            # M^(1/2)
        S = vcov[g].double()
        _, U = torch.linalg.eigh(Mh @ S @ Mh)
        p = U[:, -d:].T @ Mh                                                           # (d, r d)
        cov = p @ S @ p.T
        t = (S.diagonal().mean() / cov.diagonal().clamp_min(1e-30)).sqrt()             # v' at the old scale
        p, cov = t[:, None] * p, t[:, None] * cov * t[None, :]
        P[g] = p
        B[g] = S @ p.T @ torch.linalg.inv(cov + ridge * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype))
    return P, B


def merge_vo_pca(wv: torch.Tensor, wo: torch.Tensor | None, P: torch.Tensor, B: torch.Tensor, heads: int,
                 kv_old: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v_proj weight (kv_old d, hidden) or bias (kv_old d,), and o_proj (hidden, heads d) or None ->
    (v' (kv_new d, ...), o' (hidden, heads d) or None)."""
    kv_new, d, rd = P.shape
    V = wv.double().reshape(kv_new, rd, *wv.shape[1:])
    v_new = torch.einsum("gdx,gx...->gd...", P, V).reshape(-1, *wv.shape[1:]).to(wv.dtype)
    if wo is None:
        return v_new, None
    O = wo.double().reshape(wo.shape[0], heads, d)
    # B's rows hold each group's r old heads in order; query head i reads its old head i // (heads / kv_old)
    B_query = B.reshape(kv_old, d, d).repeat_interleave(heads // kv_old, 0)      # (heads, d, d)
    return v_new, torch.einsum("xid,ide->xie", O, B_query).reshape(wo.shape).to(wo.dtype)


def merge_state_pca(state: dict[str, torch.Tensor], cfg, kv_new: int, stats: dict[int, dict],
                    layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The state dict with each layer's (``layers``, default all) q/k/v/o projections rewritten for ``kv_new``
    KV heads by the pca merge; ``stats[layer]`` holds ``energy``, ``kcov`` and ``vcov`` (see
    ``compress.methods.gqa.kv_statistics``)."""
    out = dict(state)
    heads, kv_old = cfg.num_attention_heads, cfg.num_key_value_heads
    for l in range(cfg.num_hidden_layers) if layers is None else layers:
        p, st = f"model.layers.{l}.self_attn.", stats[l]
        # the statistics live on the CPU, and so does the math; each result goes back where its tensor was
        w = {k: t.detach().cpu() for k, t in state.items() if k.startswith(p) and "_proj." in k}
        enc, dec = pca_key_codes(st["energy"].cpu(), st["kcov"].cpu(), kv_new)
        P, B = pca_value_codes(w[f"{p}o_proj.weight"], st["vcov"].cpu(), heads, kv_old)
        new = {}
        for suffix in ("weight", "bias"):
            q, k, v = (f"{p}{n}_proj.{suffix}" for n in "qkv")
            if k in w:
                new[q], new[k] = merge_qk_pca(w[q], w[k], enc, dec, heads, kv_new)
            if v in w:
                new[v], o = merge_vo_pca(w[v], w[f"{p}o_proj.weight"] if suffix == "weight" else None, P, B, heads,
                                         kv_old)
                if o is not None:
                    new[f"{p}o_proj.weight"] = o
        out.update({k: t.to(state[k].device) for k, t in new.items()})
    return out

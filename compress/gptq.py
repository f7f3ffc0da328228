"""GPTQ (Frantar et al. 2023): post-training quantization that compensates each column's rounding
error on the columns not yet quantized, using the inputs' second moment H = 2 X^T X.

    r = gptq(w, H, fmt)                     # one weight: its fixed params, result, latent weight, loss
    gptq_model(model, blocks, fmts)         # every QuantLinear, layer by layer on calibration text

For a weight W (out, in), with H damped (H + damp * mean(diag H) * I) and U the upper Cholesky
factor of H^-1, columns are quantized left to right in blocks of B; column j's error
e = (w_j - q_j) / U_jj updates the rest of the block at once (w_k -= e * U_jk), and the block's
errors update the columns after it in one matmul (the "lazy batch" update). The params of a
group of ``block`` columns (scales, zero points) are fitted (by the format's observer) when its
first column comes up, from the columns as updated so far; per-channel and per-tensor params come from W first. With
``act_order`` the columns go in order of decreasing diag(H) and each group's params are computed
from the original W up front (static groups), so the export's group layout is unchanged.

Any ``compress.formats`` format works: int, fp8, NVFP4, MXFP4, GGUF blocks.

``gptq_model`` runs the decoder layers one at a time (``compress.calibration.layerwise``): each
layer's linears get H from that layer's inputs as produced by the already-quantized layers before it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from compress.calibration import layerwise
from compress.formats import WeightFormat


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, with dead inputs (a zero
    diagonal: never active) given a unit diagonal. What GPTQ and SparseGPT both walk along."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


class GPTQResult(NamedTuple):
    params: dict[str, torch.Tensor]  # the fixed quantization params (scales, zero points, tensor state)
    quantized: torch.Tensor          # GPTQ's weight, on the format's grid
    latent: torch.Tensor             # each column as it was just before rounding: fmt.qdq(latent, params) == quantized
    loss: float                      # sum of (w - q) H (w - q) / 2 over the rows


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False) -> GPTQResult:
    """GPTQ one weight. The latent weight is what QAT should start from: it rounds to the same
    result, but keeps each value where it fell inside its rounding bin (the quantized one sits at
    the bins' centres, half a step from any change)."""
    W = w.detach().float().clone()
    out, n = W.shape
    H = H.detach().float().clone()
    W[:, torch.diag(H) == 0] = 0
    g = fmt.block or n
    B = g * math.ceil(block_size / g) if fmt.block else block_size
    st = fmt.tensor_state(W)
    # (out, groups): the params per channel, and for act_order; else fitted group by group below (this
    # is then only their shapes: minmax's, free, never a searching observer's)
    static = (fmt.fit if act_order or not fmt.block else fmt.params)(fmt.grouped(W), st)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, U = W[:, perm], inverse_hessian_factor(H[perm][:, perm], damp)
    params = {k: torch.empty_like(v) for k, v in static.items()}
    Q, latent = torch.zeros_like(W), torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g if fmt.block else 0
            if fmt.block and not act_order and col % g == 0:  # a group starts: params from its updated columns
                fresh = fmt.fit(W1[:, i:i + g][:, None, :], st)
                for k, v in fresh.items():
                    params[k][:, grp] = v[:, 0]
            p = {k: (v if fmt.block and not act_order else static[k])[:, grp:grp + 1] for k, v in params.items()}
            q = fmt.qdq_elem(W1[:, i:i + 1][:, None, :], p, st)[:, 0, 0]
            Q[:, i1 + i], latent[:, i1 + i] = q, W1[:, i]
            e = (W1[:, i] - q) / U1[i, i]
            loss += (e.double() ** 2).sum() / 2
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    final = static if (act_order or not fmt.block) else params
    return GPTQResult({**st, **final}, Q[:, inv], latent[:, inv], float(loss))


def gptq_model(model: nn.Module, blocks: torch.Tensor, modules: dict[str, nn.Module], batch_size: int = 8,
               block_size: int = 128, damp: float = 0.01, act_order: bool = False, log=print) -> dict[str, float]:
    """GPTQ every ``QuantLinear`` in ``modules`` (name -> module) layer by layer; sets each weight
    to GPTQ's latent one and its params to GPTQ's (its fake-quant forward is GPTQ's result):
    frozen, or, for a module with learned scales, as the scales training starts from. Returns
    each module's loss."""

    def solve(name, m, H):
        r = gptq(m.weight, H, m.wformat, block_size, damp, act_order)
        m.weight.copy_(r.latent.to(m.weight.dtype))
        if m.opts["learn_scales"]:  # LSQ from GPTQ's grid (its scales are already stored values)
            m.scale.copy_(r.params["scale"]), m.zero.copy_(r.params["zero"])
        else:
            m.freeze(r.params)
        return r.loss

    return layerwise(model, blocks, modules, solve, batch_size, log, "gptq")

"""GQA conversion: fewer KV heads (SmolLM2's 3 -> 1, or MHA -> GQA), a one-shot transform that a
``distill`` stage then uptrains with KD from the original model.

    stages:
      - kind: gqa
        num_key_value_heads: 1
        merge: pca                  # mean (Ainslie et al.) | weighted | pca (see compress.kv_heads)
      - kind: distill

The result is a stock HF model with ``num_key_value_heads`` reduced in its config: the KV cache
shrinks by the same factor, and transformers, lm-eval and vLLM load it as is. The merge math is in
``compress.kv_heads``: ``weighted`` changes only k_proj and v_proj, with the query energy per RoPE pair
on calibration blocks as its weights; ``pca`` also rewrites q_proj and o_proj so that each query head
reads its old key and value back from the merged one (a rank-one complex factor per RoPE pair for
keys, a PCA in the output metric for values).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import CompressError
from compress.kv_heads import check_kv_heads, kv_bytes_per_token, merge_state, merge_state_pca
from compress.stages import StageConfig, StageMethod, earlier_stage, register


class GqaStage(StageConfig):
    kind: Literal["gqa"] = "gqa"
    num_key_value_heads: int = Field(ge=1)
    merge: Literal["mean", "weighted", "pca"] = "weighted"
    calibration_blocks: int = Field(32, ge=1)  # weighted, pca: the blocks whose statistics drive the merge
    max_steps: None = None


@torch.no_grad()
def kv_statistics(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                  kv_new: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, on ``blocks``: ``energy`` (kv heads, d / 2), E[q_j^2 + q_(j+d/2)^2] summed over the query
    heads of each KV head; with ``kv_new`` (the pca merge) also ``kcov`` (d / 2, kv, kv), E[z z^H] of the
    keys' RoPE pairs as complex numbers, and ``vcov`` (kv_new, r d, r d), E[v v^T] of each merged group's
    stacked value heads."""
    from compress.models import head_dim

    cfg = model.config
    H, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    half = d // 2
    acc = {l: {"energy": torch.zeros(H, d, dtype=torch.float64)} for l in range(cfg.num_hidden_layers)}
    if kv_new is not None:
        for a in acc.values():
            a["kcov"] = torch.zeros(half, kv, kv, dtype=torch.complex128)
            a["vcov"] = torch.zeros(kv_new, kv // kv_new * d, kv // kv_new * d, dtype=torch.float64)

    def hook(l, kind):
        def add(m, args, out):  # returns None: a value would replace the output
            x = out.detach().double()
            if kind == "q":
                acc[l]["energy"].add_(x.reshape(-1, H, d).pow(2).sum(0).cpu())
            elif kind == "k":
                x = x.reshape(-1, kv, d)
                z = torch.complex(x[..., :half], x[..., half:])
                acc[l]["kcov"].add_(torch.einsum("nhj,ngj->jhg", z, z.conj()).cpu())
            else:
                v = x.reshape(-1, kv_new, kv // kv_new * d)
                acc[l]["vcov"].add_(torch.einsum("ngx,ngy->gxy", v, v).cpu())
        return add

    kinds = "qkv" if kv_new is not None else "q"
    hooks = [getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(hook(l, kind))
             for l, layer in enumerate(model.model.layers) for kind in kinds]
    try:
        for s in range(0, len(blocks), batch_size):
            model(input_ids=blocks[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    n = blocks.numel()
    for a in acc.values():
        e = a["energy"]
        pairs = e[:, :half] + e[:, half:]                       # (H, d/2): RoPE rotates j with j + d/2
        a["energy"] = pairs.reshape(kv, H // kv, half).sum(1) / n
        for key in ("kcov", "vcov"):
            if key in a:
                a[key] = a[key] / n
    return acc


def query_energy(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{layer: (kv heads, d / 2)}: the query energy per RoPE pair of each KV head (the weighted merge)."""
    return {l: a["energy"].float() for l, a in kv_statistics(model, blocks, batch_size).items()}


def check_pca_mergeable(cfg, model: nn.Module | None = None) -> None:
    """The pca merge folds complex factors into q_proj and k_proj: every head dim must be rotary and no
    per-head norm may sit between the projections and RoPE."""
    if (getattr(cfg, "partial_rotary_factor", None) or 1.0) < 1.0:
        raise CompressError("merge: pca needs RoPE on every head dim (this model has partial_rotary_factor "
                            f"{cfg.partial_rotary_factor}); use merge: weighted")
    attn = model.model.layers[0].self_attn if model is not None else None
    if attn is not None and (hasattr(attn, "k_norm") or hasattr(attn, "q_norm")):
        raise CompressError("merge: pca cannot fold into a model with a per-head q/k norm "
                            f"({type(attn).__name__}); use merge: weighted")


@register(GqaStage)
class Gqa(StageMethod):
    trains = False

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        before = earlier_stage(cfg, recipe, ("sparsify", "qat", "quantize"))
        if before:
            raise CompressError(f"a gqa stage after a {before} stage is not supported (its merged heads would "
                                "lose the mask or the rounding); convert first (gqa -> distill -> ...)")
        student = configs.get("student")
        if student is not None:
            check_kv_heads(student.num_attention_heads, student.num_key_value_heads, cfg.num_key_value_heads)
            if cfg.merge == "pca":
                check_pca_mergeable(student)

    @classmethod
    def out_config(cls, cfg, config):
        from compress.pruning import pruned_config

        return pruned_config(config, {"num_key_value_heads": cfg.num_key_value_heads})

    def transform(self, model: nn.Module) -> nn.Module:
        from transformers import AutoModelForCausalLM

        cfg, ctx, old = self.cfg, self.ctx, model.config
        check_kv_heads(old.num_attention_heads, old.num_key_value_heads, cfg.num_key_value_heads)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if cfg.merge == "mean":
            state = merge_state(state, old, cfg.num_key_value_heads, "mean")
        else:
            blocks, bs = ctx.calibration(cfg.calibration_blocks), ctx.recipe.train.micro_batch_size
            if cfg.merge == "weighted":
                state = merge_state(state, old, cfg.num_key_value_heads, "weighted", query_energy(model, blocks, bs))
            else:
                check_pca_mergeable(old, model)
                stats = kv_statistics(model, blocks, bs, kv_new=cfg.num_key_value_heads)
                state = merge_state_pca(state, old, cfg.num_key_value_heads, stats)
        new_cfg = self.out_config(cfg, old)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        small = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
        missing, unexpected = small.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(new_cfg, "tie_word_embeddings", False) else set()
        assert not unexpected and set(missing) <= tied, f"merged state does not fit: {missing} {unexpected}"
        small.config.use_cache = False
        self.transform_info = {"merge": cfg.merge, "kv_heads": [old.num_key_value_heads, cfg.num_key_value_heads],
                               "kv_bytes_per_token_bf16": [kv_bytes_per_token(old), kv_bytes_per_token(new_cfg)]}
        return small.to(device)

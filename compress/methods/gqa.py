"""GQA conversion: fewer KV heads (SmolLM2's 3 -> 1, or MHA -> GQA), a one-shot transform that a
``distill`` stage then uptrains with KD from the original model.

    stages:
      - kind: gqa
        num_key_value_heads: 1
        merge: weighted             # mean (Ainslie et al.) | weighted (output-preserving, see below)
      - kind: distill

The result is a stock HF model with ``num_key_value_heads`` reduced in its config: the KV cache
shrinks by the same factor, and transformers, lm-eval and vLLM load it as is. The merge math is in
``compress.kv_heads``; ``weighted`` reads the query energy per RoPE pair on calibration blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import CompressError
from compress.kv_heads import check_kv_heads, kv_bytes_per_token, merge_state
from compress.stages import StageConfig, StageMethod, earlier_stage, register


class GqaStage(StageConfig):
    kind: Literal["gqa"] = "gqa"
    num_key_value_heads: int = Field(ge=1)
    merge: Literal["mean", "weighted"] = "weighted"
    calibration_blocks: int = Field(32, ge=1)  # weighted: blocks whose query energies weight the key merge
    max_steps: None = None


@torch.no_grad()
def query_energy(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{layer: (kv heads, d / 2)} summed E[q_j^2 + q_(j+d/2)^2] over the query heads of each KV head."""
    from compress.models import head_dim

    cfg = model.config
    H, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    acc = {l: torch.zeros(H, d, dtype=torch.float64) for l in range(cfg.num_hidden_layers)}
    def hook(l):
        def add(m, args, out):  # returns None: a value would replace the output
            acc[l].add_(out.float().reshape(-1, H, d).pow(2).sum(0).double().cpu())
        return add

    hooks = [layer.self_attn.q_proj.register_forward_hook(hook(l)) for l, layer in enumerate(model.model.layers)]
    try:
        for s in range(0, len(blocks), batch_size):
            model(input_ids=blocks[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    n = blocks.numel()
    out = {}
    for l, e in acc.items():
        pairs = e[:, : d // 2] + e[:, d // 2:]                  # (H, d/2): RoPE rotates j with j + d/2
        out[l] = (pairs.reshape(kv, H // kv, d // 2).sum(1) / n).float()
    return out


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

    @classmethod
    def out_config(cls, cfg, config):
        from compress.pruning import pruned_config

        return pruned_config(config, {"num_key_value_heads": cfg.num_key_value_heads})

    def transform(self, model: nn.Module) -> nn.Module:
        from transformers import AutoModelForCausalLM

        cfg, ctx, old = self.cfg, self.ctx, model.config
        check_kv_heads(old.num_attention_heads, old.num_key_value_heads, cfg.num_key_value_heads)
        energy = None
        if cfg.merge == "weighted":
            energy = query_energy(model, ctx.calibration(cfg.calibration_blocks), ctx.recipe.train.micro_batch_size)
        state = merge_state({k: v.detach() for k, v in model.state_dict().items()}, old, cfg.num_key_value_heads,
                            cfg.merge, energy)
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

"""GQA conversion: fewer KV heads (SmolLM2's 3 -> 1, or MHA -> GQA), a one-shot transform that a
``distill`` stage then uptrains with KD from the original model.

    stages:
      - kind: gqa
        num_key_value_heads: 1
        merge: pca                  # mean (Ainslie et al.) | weighted | pca (see compress.kv_heads)
        blockwise: {lr: 1.0e-3}     # optional: then each layer trained towards the original's output
      - kind: distill

The result is a stock HF model with ``num_key_value_heads`` reduced in its config: the KV cache
shrinks by the same factor, and transformers, lm-eval and vLLM load it as is. The merge math is in
``compress.kv_heads``: ``weighted`` changes only k_proj and v_proj, with the query energy per RoPE pair
on calibration blocks as its weights; ``pca`` also rewrites q_proj and o_proj so that each query head
reads its old key and value back from the merged one (a rank-one complex factor per RoPE pair for
keys, a PCA in the output metric for values). ``blockwise`` (``compress.blockwise``, as on the
quantize / qat / sparsify stages) then trains each merged decoder layer, in turn, so that its output
matches the original layer's at that depth on calibration text: the merge fixes where the weights start,
the layer's own output error sets where they end, before any KD step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.blockwise import BlockwiseConfig, snapshot_layers
from compress.calibration import each_layer
from compress.errors import CompressError
from compress.kv_heads import check_kv_heads, kv_bytes_per_token, merge_state, merge_state_pca
from compress.stages import StageConfig, StageMethod, earlier_stage, register


class GqaStage(StageConfig):
    kind: Literal["gqa"] = "gqa"
    num_key_value_heads: int = Field(ge=1)
    merge: Literal["mean", "weighted", "pca"] = "pca"
    calibration_blocks: int = Field(32, ge=1)  # weighted, pca: the blocks whose statistics drive the merge
    sequential: bool = True  # pca: each layer's statistics read with the layers before it merged
    blockwise: BlockwiseConfig | None = None  # then each merged layer trained towards the original's output
    max_steps: None = None


class KvStatistics:
    """One layer's statistics, read from its q/k/v projections' outputs (hooks on its attention module):
    ``energy`` (kv heads, d / 2), E[q_j^2 + q_(j+d/2)^2] summed over the query heads of each KV head; with
    ``kv_new`` (the pca merge) also ``kcov`` (d / 2, kv, kv), E[z z^H] of the keys' RoPE pairs as complex
    numbers, and ``vcov`` (kv_new, r d, r d), E[v v^T] of each merged group's stacked value heads."""

    def __init__(self, cfg, kv_new: int | None = None):
        from compress.models import head_dim

        self.H, self.kv, self.d, self.kv_new = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), kv_new
        self.acc = {"energy": torch.zeros(self.H, self.d, dtype=torch.float64)}
        if kv_new is not None:
            rd = self.kv // kv_new * self.d
            self.acc["kcov"] = torch.zeros(self.d // 2, self.kv, self.kv, dtype=torch.complex128)
            self.acc["vcov"] = torch.zeros(kv_new, rd, rd, dtype=torch.float64)

    def attach(self, attn: nn.Module) -> list:
        def add(kind):
            def hook(m, args, out):  # returns None: a value would replace the output
                x, half = out.detach().double(), self.d // 2
                if kind == "q":
                    self.acc["energy"].add_(x.reshape(-1, self.H, self.d).pow(2).sum(0).cpu())
                elif kind == "k":
                    x = x.reshape(-1, self.kv, self.d)
                    z = torch.complex(x[..., :half], x[..., half:])
                    self.acc["kcov"].add_(torch.einsum("nhj,ngj->jhg", z, z.conj()).cpu())
                else:
                    v = x.reshape(-1, self.kv_new, self.kv // self.kv_new * self.d)
                    self.acc["vcov"].add_(torch.einsum("ngx,ngy->gxy", v, v).cpu())
            return hook

        kinds = "qkv" if self.kv_new is not None else "q"
        return [getattr(attn, f"{kind}_proj").register_forward_hook(add(kind)) for kind in kinds]

    def result(self, tokens: int) -> dict[str, torch.Tensor]:
        e, half = self.acc["energy"], self.d // 2
        pairs = e[:, :half] + e[:, half:]                       # (H, d/2): RoPE rotates j with j + d/2
        out = {k: v / tokens for k, v in self.acc.items()}
        out["energy"] = pairs.reshape(self.kv, self.H // self.kv, half).sum(1) / tokens
        return out


@torch.no_grad()
def kv_statistics(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                  kv_new: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: ``KvStatistics`` result} of every layer on ``blocks``, in one pass of the unchanged model."""
    stats = {l: KvStatistics(model.config, kv_new) for l in range(model.config.num_hidden_layers)}
    hooks = [h for l, st in stats.items() for h in st.attach(model.model.layers[l].self_attn)]
    try:
        for s in range(0, len(blocks), batch_size):
            model(input_ids=blocks[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {l: st.result(blocks.numel()) for l, st in stats.items()}


@torch.no_grad()
def sequential_pca_state(model: nn.Module, blocks: torch.Tensor, batch_size: int, kv_new: int) -> dict:
    """The pca merge layer by layer (``compress.calibration.each_layer``, as GPTQ runs), each layer's statistics
    read on the inputs the merged layers before it give; the model is left as it was.

    A merged layer runs inside the old architecture: each old KV head holds its group's merged head and
    q_proj/o_proj their rewritten weights, which computes exactly what the GQA layer computes."""
    cfg, kv_old = model.config, model.config.num_key_value_heads
    r = kv_old // kv_new
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    attn = [layer.self_attn for layer in model.model.layers]
    saved = [{n: {k: t.detach().to("cpu", copy=True) for k, t in getattr(a, n).state_dict().items()} for n in names}
             for a in attn]  # on the host: a GPU holds the model, not a second copy of its attention
    merged = {}

    def step(l, layer, run, tokens):
        a, stats = layer.self_attn, KvStatistics(cfg, kv_new)
        hooks = stats.attach(a)
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        p = f"model.layers.{l}.self_attn."
        part = {f"{p}{n}.{k}": t for n in names for k, t in getattr(a, n).state_dict().items()}
        new = merge_state_pca(part, cfg, kv_new, {l: stats.result(tokens)}, layers=[l])
        merged.update(new)
        for n in names:  # run the merged layer in the old shape: each old head holds its group's merged head
            for k in getattr(a, n).state_dict():
                t = new[f"{p}{n}.{k}"]
                if n in ("k_proj", "v_proj"):
                    t = t.reshape(kv_new, -1, *t.shape[1:]).repeat_interleave(r, 0).reshape(-1, *t.shape[1:])
                getattr(getattr(a, n), k).copy_(t)

    try:
        each_layer(model, blocks, step, batch_size)
    finally:
        for a, orig in zip(attn, saved):
            for n in names:
                getattr(a, n).load_state_dict(orig[n])
    return merged


def query_energy(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{layer: (kv heads, d / 2)}: the query energy per RoPE pair of each KV head (the weighted merge)."""
    return {l: a["energy"].float() for l, a in kv_statistics(model, blocks, batch_size).items()}


def check_pca_mergeable(cfg, model: nn.Module | None = None) -> None:
    """The pca merge folds complex factors into q_proj and k_proj: every head dim must be rotary and no
    per-head norm may sit between the projections and RoPE."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0
    if factor < 1.0:
        raise CompressError(f"merge: pca needs RoPE on every head dim (this model has partial_rotary_factor {factor}); "
                            "use merge: weighted")
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
        originals = snapshot_layers(model) if cfg.blockwise is not None else None  # the targets, before the merge
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if cfg.merge == "mean":
            state = merge_state(state, old, cfg.num_key_value_heads, "mean")
        else:
            blocks, bs = ctx.calibration(cfg.calibration_blocks), ctx.recipe.train.micro_batch_size
            if cfg.merge == "weighted":
                state = merge_state(state, old, cfg.num_key_value_heads, "weighted", query_energy(model, blocks, bs))
            else:
                check_pca_mergeable(old, model)
                kv_new = cfg.num_key_value_heads
                if cfg.sequential:
                    state.update(sequential_pca_state(model, blocks, bs, kv_new))
                else:
                    state = merge_state_pca(state, old, kv_new, kv_statistics(model, blocks, bs, kv_new=kv_new))
        new_cfg = self.out_config(cfg, old)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        small = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
        missing, unexpected = small.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(new_cfg, "tie_word_embeddings", False) else set()
        assert not unexpected and set(missing) <= tied, f"merged state does not fit: {missing} {unexpected}"
        small.config.use_cache = False
        small.to(device)
        self.transform_info = {"merge": cfg.merge, "kv_heads": [old.num_key_value_heads, cfg.num_key_value_heads],
                               "kv_bytes_per_token_bf16": [kv_bytes_per_token(old), kv_bytes_per_token(new_cfg)]}
        if cfg.blockwise is not None:
            self.transform_info |= cfg.blockwise.run(small, originals, ctx)
        return small

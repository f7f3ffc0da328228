"""Dense -> MoE upcycling: each MLP (or the chosen layers') becomes E experts and a top-k router,
a one-shot transform that a ``distill`` (or ``finetune``) stage then trains, with the router's
load-balancing and z losses added by the loop.

    stages:
      - kind: upcycle
        experts: 4
        top_k: 2
        init: copy            # copy (+ noise) | split (channels cut into E parts)
        capacity_factor: 1.25 # optional: while training, each expert takes at most 1.25 x its even share
        layers: [10, 11, 12]  # optional: only these layers (default: all); the others stay dense
        shared_expert: false  # optional: a shared expert (the dense MLP) beside the routed ones
      - kind: distill         # KD from the dense model

The result is a stock ``MixtralForCausalLM``, or, with ``layers`` or ``shared_expert``, a stock
``Qwen2MoeForCausalLM`` (``mlp_only_layers`` for the dense ones): transformers, lm-eval and vLLM
load either without our code. Total vs active parameters and each MoE layer's expert utilization
(before and after training) go to the report, ``final/expert_utilization.json`` and the logger.
The math is in ``compress.upcycle``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, model_validator
from torch import nn

from compress.errors import CompressError
from compress.upcycle import (check_upcycle, moe_config, moe_layers, param_counts, upcycled_state, utilization,
                              with_capacity)
from compress.stages import StageConfig, StageMethod, earlier_stage, register


class UpcycleStage(StageConfig):
    kind: Literal["upcycle"] = "upcycle"
    experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    init: Literal["copy", "split"] = "copy"
    noise: float = Field(0.0, ge=0.0)         # copy: relative weight noise that breaks the experts' symmetry
    router_std: float = Field(0.02, ge=0.0)   # copy: the router's initial weight std
    aux_loss_coef: float = Field(0.01, ge=0.0)
    z_loss_coef: float = Field(0.001, ge=0.0)
    calibration_blocks: int = Field(16, ge=1)  # for the utilization histograms
    # training only: an expert takes at most factor x tokens x top_k / experts routings a batch, the
    # highest-weighted first; the rest are dropped (None: dropless, as inference and the export are)
    capacity_factor: float | None = Field(None, gt=0.0)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)  # None: every layer
    shared_expert: bool = False
    max_steps: None = None

    @model_validator(mode="after")
    def _distinct_layers(self) -> "UpcycleStage":
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("upcycle.layers lists a layer twice; list each layer once")
        return self


@register(UpcycleStage)
class Upcycle(StageMethod):
    trains = False

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        before = earlier_stage(cfg, recipe, ("sparsify", "qat", "quantize", "upcycle"))
        if before:
            raise CompressError(f"an upcycle stage after a {before} stage is not supported; upcycle the dense "
                                "model first (upcycle -> distill -> ...)")
        check_upcycle(configs.get("student"), cfg.experts, cfg.top_k, cfg.init, cfg.layers)

    @classmethod
    def out_config(cls, cfg, config):
        return moe_config(config, cfg.experts, cfg.top_k, cfg.init, cfg.aux_loss_coef, cfg.z_loss_coef, cfg.layers,
                          cfg.shared_expert)

    def transform(self, model: nn.Module) -> nn.Module:
        from transformers import AutoModelForCausalLM

        cfg, ctx = self.cfg, self.ctx
        check_upcycle(model.config, cfg.experts, cfg.top_k, cfg.init, cfg.layers)
        new_cfg = self.out_config(cfg, model.config)
        sparse = moe_layers(new_cfg)
        state = upcycled_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config, cfg.experts,
                               cfg.init, cfg.noise, cfg.router_std, ctx.recipe.seed, layers=sparse,
                               shared_expert=None if new_cfg.model_type == "mixtral" else cfg.shared_expert)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        moe = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
        missing, unexpected = moe.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if new_cfg.tie_word_embeddings else set()
        assert not unexpected and set(missing) <= tied, f"upcycled state does not fit: {missing} {unexpected}"
        moe = moe.to(device)
        moe.config.use_cache = False
        if cfg.capacity_factor is not None:
            with_capacity(moe, cfg.capacity_factor)
        blocks = ctx.calibration(cfg.calibration_blocks)
        self.transform_info = {"experts": cfg.experts, "top_k": cfg.top_k, "init": cfg.init,
                               "capacity_factor": cfg.capacity_factor, "architecture": type(moe).__name__,
                               "moe_layers": sparse, "shared_expert": cfg.shared_expert,
                               "moe_params": param_counts(new_cfg),
                               "utilization_at_init": utilization(moe, blocks, ctx.recipe.train.micro_batch_size)}
        return moe

    def export(self, model: nn.Module, final_dir) -> None:
        from pathlib import Path

        from compress.checkpoint import publish_file

        blocks = self.ctx.calibration(self.cfg.calibration_blocks)
        util = utilization(model, blocks, self.ctx.recipe.train.micro_batch_size)
        at_init = json.loads((Path(self.stage_dir) / "transform.json").read_text()).get("utilization_at_init")
        layers = moe_layers(model.config)
        payload = {"params": param_counts(model.config), "moe_layers": layers, "utilization": util,
                   "utilization_at_init": at_init}
        publish_file(Path(final_dir) / "expert_utilization.json", lambda p: p.write_text(json.dumps(payload, indent=1)))
        self.ctx.logger.log({"stage": self.index, "step": 0,
                             **{f"moe/layer{l}_expert{e}": u for l, row in zip(layers, util) for e, u in enumerate(row)}})

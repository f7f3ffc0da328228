"""Structured pruning (width and depth) as a one-shot stage; recover with a ``distill`` stage after it.

    student: {init: teacher}            # start from a full copy of the teacher
    stages:
      - kind: prune
        num_hidden_layers: 24           # explicit target shape: any of the five keys ...
        hidden_size: 448
        # target_params: 0.5            # ... or a budget: this fraction of the non-embedding
        #                               #     parameters, the shape found by a search
        importance: activation          # random: the same shape with structures drawn at random
      - kind: distill                   # KD from the unpruned teacher
      - kind: eval

The result is a stock HF model of the same architecture and a smaller shape (config.json says
which). The math lives in ``compress.pruning`` and ``compress.importance``; this module holds the config, the pre-flight
checks, the importance cache and the budget search. Importance is computed once per (model
weights, data, calibration draw) and cached under ``cache_dir``, so a second run with another
target reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.checkpoint import publish_file
from compress.config import Strict
from compress.errors import CompressError
from compress.modelio import custom_modules
from compress.importance import activation_stats, calib_loss, log_probs, random_stats
from compress.pruning import (SHAPE_KEYS, apply_plan, candidate_shapes, check_shape, make_plan, non_embedding_params,
                              pruned_config, shape_of, spread)
from compress.stages import StageConfig, StageMethod, register


class SearchConfig(Strict):
    """The budget search (``target_params``): candidate shapes scored by calibration KL to the unpruned model."""

    max_candidates: int = Field(24, ge=1)  # evenly spread over every shape within `tolerance` of the budget
    score_blocks: int = Field(16, ge=1)  # calibration blocks each candidate is scored on
    tolerance: float = Field(0.02, gt=0.0, lt=0.5)  # budget tolerance (relative)
    hidden_multiple: int = Field(64, ge=1)
    mlp_multiple: int = Field(32, ge=1)
    min_depth: float = Field(0.5, gt=0.0, le=1.0)  # cut at most this far on each axis
    min_width: float = Field(0.5, gt=0.0, le=1.0)


class PruneStage(StageConfig):
    """Remove whole layers, heads, MLP channels and hidden channels, least important first."""

    kind: Literal["prune"] = "prune"
    num_hidden_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    target_params: float | None = Field(None, gt=0.0, lt=1.0)  # fraction of non-embedding parameters
    importance: Literal["activation", "random"] = "activation"
    layer_importance: Literal["kl", "cosine"] = "kl"  # kl: calibration KL to the full model when a block is skipped
    calibration_blocks: int = Field(64, ge=1)
    layer_blocks: int = Field(16, ge=1)  # of those, how many score layers by KL (a forward per layer per block)
    search: SearchConfig = Field(default_factory=SearchConfig)
    cache_dir: str = ".cache/importance"

    @model_validator(mode="after")
    def _one_target(self) -> "PruneStage":
        explicit = self.explicit()
        if not explicit and self.target_params is None:
            raise ValueError("prune needs a target: target_params (e.g. 0.5) or a shape (num_hidden_layers, "
                             "hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)")
        if explicit and self.target_params is not None:
            raise ValueError(f"prune has both target_params and {', '.join(explicit)}; give one kind of target")
        if self.max_steps is not None:
            raise ValueError("prune does not train (max_steps); add a distill stage after it to recover")
        return self

    def explicit(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SHAPE_KEYS if getattr(self, k) is not None}


def fingerprint(model: nn.Module) -> str:
    """A hash of every tensor of ``model`` (the importance cache key's model part)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@register(PruneStage)
class Prune(StageMethod):
    trains = False

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        student = configs.get("student")
        if student is None:
            return  # shape unknown here (after a budget search): checked again before the transform
        if cfg.target_params is None:
            check_shape(student, {**shape_of(student), **cfg.explicit()})
        elif not cls.candidates(cfg, student):
            raise CompressError(f"prune.target_params={cfg.target_params}: no shape within {cfg.search.tolerance:.0%} "
                                f"of the budget inside the search bounds (min_depth={cfg.search.min_depth}, "
                                f"min_width={cfg.search.min_width}); lower them or change target_params")

    @classmethod
    def out_config(cls, cfg, config):
        return pruned_config(config, {**shape_of(config), **cfg.explicit()}) if cfg.target_params is None else None

    @staticmethod
    def candidates(cfg, model_cfg) -> list[dict[str, int]]:
        s = cfg.search
        check_shape(model_cfg, shape_of(model_cfg))  # the architecture is supported
        return candidate_shapes(model_cfg, cfg.target_params, tolerance=s.tolerance, hidden_multiple=s.hidden_multiple,
                                mlp_multiple=s.mlp_multiple, min_depth=s.min_depth, min_width=s.min_width)

    def stats(self, model: nn.Module) -> dict:
        """Importance statistics of ``model``: cached per (weights, data, calibration draw)."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.importance == "random":
            return random_stats(model.config, ctx.recipe.seed)
        layer_blocks = min(cfg.layer_blocks, cfg.calibration_blocks) if cfg.layer_importance == "kl" else 0
        key = hashlib.sha256(json.dumps([fingerprint(model), ctx.data.key, cfg.calibration_blocks, ctx.recipe.seed,
                                         layer_blocks]).encode()).hexdigest()[:24]
        path = Path(cfg.cache_dir) / f"{key}.pt"
        if path.is_file():
            print(f"prune: importance from cache {path}", flush=True)
            return torch.load(path, weights_only=True)
        t0 = time.perf_counter()
        blocks = ctx.calibration(cfg.calibration_blocks)
        stats = activation_stats(model, blocks, ctx.recipe.train.micro_batch_size, layer_blocks=layer_blocks)
        print(f"prune: importance of {len(blocks)} calibration blocks in {time.perf_counter() - t0:.0f} s", flush=True)
        publish_file(path, lambda tmp: torch.save(stats, tmp))
        return stats

    def transform(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        if custom_modules(model):
            raise CompressError("prune needs a stock model, but an earlier stage left custom modules "
                                f"({', '.join(sorted(custom_modules(model)))}); put prune before that stage")
        model.eval()
        stats = self.stats(model)
        before = non_embedding_params(model.config)
        if cfg.target_params is None:
            shape = {**shape_of(model.config), **cfg.explicit()}
            check_shape(model.config, shape)
            search = None
        else:
            shape, search = self.search(model, stats)
        plan = make_plan(model.config, shape, stats, cfg.layer_importance)
        small = apply_plan(model, plan)
        after = non_embedding_params(small.config)
        self.transform_info = {
            "shape_before": shape_of(model.config), "shape": shape,
            "non_embedding_params": {"before": before, "after": after, "fraction": after / before},
            "layers_kept": plan.layers, "importance": cfg.importance,
            "layer_scores": [round(float(v), 5) for v in stats[
                "layer_kl" if cfg.layer_importance == "kl" else "layer_cosine"]],
            "candidates": search,
        }
        print(f"prune: {shape_of(model.config)} -> {shape} ({after / before:.1%} of non-embedding parameters)", flush=True)
        return small

    def search(self, model: nn.Module, stats: dict) -> tuple[dict[str, int], list[dict]]:
        """The candidate shape within budget whose pruned model stays closest (KL) to ``model``."""
        cfg, ctx = self.cfg, self.ctx
        cands = spread(self.candidates(cfg, model.config), cfg.search.max_candidates)
        blocks = ctx.calibration(cfg.search.score_blocks, seed=ctx.recipe.seed + 1)
        bs = ctx.recipe.train.micro_batch_size
        ref = log_probs(model, blocks, bs)
        total = non_embedding_params(model.config)
        rows = []
        for i, shape in enumerate(cands):
            small = apply_plan(model, make_plan(model.config, shape, stats, cfg.layer_importance))
            kl = calib_loss(small, blocks, bs, reference=ref)
            rows.append({**shape, "params_fraction": round(non_embedding_params(model.config, shape) / total, 4),
                         "calib_kl": round(kl, 4)})
            ctx.logger.log({"stage": self.index, "step": i, "search/calib_kl": kl})
            print(f"prune search {i + 1}/{len(cands)}: {shape} kl={kl:.3f}", flush=True)
            del small
        best = min(range(len(rows)), key=lambda i: rows[i]["calib_kl"])
        rows[best]["chosen"] = True
        return cands[best], rows

    def loaded(self, info: dict) -> None:
        """Every rank: later stages map student layers to teacher layers through the kept ones."""
        kept, old = info.get("layers_kept"), self.ctx.layer_map
        if kept is not None and old is not None:
            self.ctx.layer_map = [old[i] for i in kept]

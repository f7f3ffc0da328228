"""The frozen teacher: never trained, never given optimizer state or gradients.

Placement (``teacher.shard`` in the recipe):
  * ``none``: one frozen copy per rank (in ``teacher.dtype``; bf16 halves it on GPU);
  * ``zero3``: parameters partitioned across ranks by an inference-only DeepSpeed ZeRO-3
    engine, gathered layer by layer during forward, so N ranks hold 1/N of it each.
The other memory saver is offline KD (``compress.offline_kd``): top-k log-probs once to disk.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.chunked_loss import head_input_captured
from compress.models import rotary_kept_fp32


class Teacher:
    def __init__(self, model: nn.Module, *, shard: str = "none", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, micro_batch: int = 1):
        model.eval().requires_grad_(False)
        model.config.use_cache = False
        self.config = model.config
        if shard == "zero3":
            import deepspeed

            ds = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": 3},
                  "bf16": {"enabled": dtype == torch.bfloat16}}
            with rotary_kept_fp32(model):
                engine, *_ = deepspeed.initialize(model=model, config=ds)  # no optimizer: inference only
            engine.eval()
            self.module = engine
        else:
            with rotary_kept_fp32(model):
                self.module = model.to(device=device, dtype=dtype)

    @property
    def model(self) -> nn.Module:
        """The HF model itself (under ZeRO-3 its forward gathers the partitioned layers)."""
        return getattr(self.module, "module", self.module)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, hidden: bool = False):
        return self.module(input_ids=input_ids, output_hidden_states=hidden)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self(input_ids).logits

    @torch.no_grad()
    def final_hidden(self, input_ids: torch.Tensor, hidden: bool = False):
        """(forward output with 1-token logits, final hidden states (B, T, D)): the LM head's input,
        for a chunked loss that applies ``head`` a few tokens at a time."""
        with head_input_captured(self.model) as box:
            out = self(input_ids, hidden=hidden)
        return out, box["hidden"]

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

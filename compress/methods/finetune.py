"""Plain next-token cross entropy, no teacher: the CE-only baseline that distillation must beat.

    stages:
      - kind: finetune
        max_steps: 100
"""

from __future__ import annotations

from typing import Literal

from compress.stages import StageConfig, StageMethod, register


class FinetuneStage(StageConfig):
    """Next-token cross-entropy training on the data only."""

    kind: Literal["finetune"] = "finetune"


@register(FinetuneStage)
class Finetune(StageMethod):
    """The base loop's loss (cross entropy) with no hooks."""

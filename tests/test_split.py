"""One train/validation split everywhere: training data, the pydocs lm-eval tasks, run_lm_eval."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.data import is_validation, python_docs_dir, split_documents
from compress.recipe import DataConfig
from eval.harness import run_lm_eval, task_manager
from eval.tasks.utils import QUICK_CHARS, load_pydocs, load_pydocs_quick


def names(files, root):
    return [str(f.relative_to(root)) for f in files]


def held_out(val_fraction):
    """Validation document names written out from the hash rule, not through split_documents."""
    root = python_docs_dir()
    return [n for n in names(sorted(root.rglob("*.txt")), root) if is_validation(n, val_fraction)]


@pytest.mark.parametrize("val_fraction", [0.2, 0.02])
def test_pydocs_task_loads_exactly_the_runs_validation_documents(val_fraction):
    root, train, val = split_documents(DataConfig(val_fraction=val_fraction))
    # lm-eval passes every metadata key, its own too (version, config_source, model args)
    docs = load_pydocs(val_fraction=val_fraction, version=1.0, config_source="x.yaml", pretrained="m")["test"]
    assert docs["name"] == names(val, root) == held_out(val_fraction)
    assert not set(docs["name"]) & set(names(train, root)), "a training document is scored as held out"
    first = val[0].read_text(encoding="utf-8", errors="replace")
    assert docs["text"][0] == first
    quick = load_pydocs_quick(val_fraction=val_fraction)["test"]
    assert quick["name"] == names(val, root)[:12] and quick["text"][0] == first[:QUICK_CHARS]


def test_pydocs_task_honours_max_docs_and_defaults():
    root, train, val = split_documents(DataConfig(val_fraction=0.2, max_docs=60))
    docs = load_pydocs(val_fraction=0.2, max_docs=60, block_size=32, cache_dir="x", files=[], source="python-docs")
    assert docs["test"]["name"] == names(val, root) and len(val) < len(held_out(0.2))
    assert load_pydocs()["test"]["name"] == held_out(DataConfig().val_fraction)
    # trained on other text: the python docs are all unseen, the default split serves
    other = load_pydocs(source="files", files=["notes/*.txt"], val_fraction=0.3)
    assert other["test"]["name"] == held_out(DataConfig().val_fraction)


def test_task_manager_metadata_reaches_the_dataset():
    task = next(iter(task_manager(include_defaults=False, metadata={"val_fraction": 0.02}).load(["pydocs_ppl"])["tasks"].values()))
    assert [d["name"] for d in task.test_docs()] == held_out(0.02)


def test_run_lm_eval_scores_validation_documents(tiny_teacher):
    """What the model actually reads under run_lm_eval(data=...) is the run's validation text."""
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)
    data = DataConfig(val_fraction=0.02).model_dump()
    root, train, val = split_documents(DataConfig(**data))
    # the bug this guards: the default 0.05 split starts with documents that 0.02 trains on
    assert names(val[:2], root) != held_out(0.05)[:2] and set(held_out(0.05)[:2]) <= set(names(train, root))
    ids = {n: tok(f.read_text(encoding="utf-8", errors="replace")[:QUICK_CHARS], add_special_tokens=False).input_ids
           for n, f in zip(names(train + val, root), train + val)}
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows.append((args[0] if args else kwargs["input_ids"]).clone()),
                                           with_kwargs=True)
    try:
        s = run_lm_eval(model, tok, ["pydocs_ppl_quick"], limit=2, batch_size=1, data=data)["pydocs_ppl_quick"]
    finally:
        hook.remove()
    assert s["byte_perplexity"] > 1
    scored = set()
    for batch in rows:
        for row in batch.tolist():
            text = row[1:]  # after lm-eval's prefix token; each document fits one window
            hits = [n for n, d in ids.items() if d[: len(text)] == text]
            assert len(hits) == 1, f"a scored window matches {len(hits)} documents"
            scored.add(hits[0])
    assert scored == set(names(val[:2], root))

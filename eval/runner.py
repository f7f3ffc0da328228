"""Judge a compressed model against its teacher, the same way every time.

    results = evaluate_pair(student, teacher, tokenizer, EvalStage(), val_blocks, data=recipe.data.model_dump())

Three kinds of evidence, then gates:
  1. lm-eval tasks (``eval.harness``) on both models, e.g. MMLU and held-out perplexity;
  2. teacher-relative metrics on held-out blocks (``compress.metrics``): ppl ratio, top-1 agreement, KL;
  3. speculative decoding (``eval.speculative``): the student drafts for its teacher, greedy
     output must equal the teacher's own, with acceptance rate and tokens/s for each k, and
     transformers' assisted generation on the same prompts beside ours;
  4. gates: thresholds relative to the teacher, each printed with its measured value.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.checkpoint import publish_file
from compress.export import bytes_on_disk
from compress.metrics import bits_per_byte, pair_metrics
from compress.models import param_count
from eval.harness import run_lm_eval
from eval.decoders import serves_graphs
from eval.speculative import assisted_generate_hf, serve_prompts, serve_prompts_across_tokenizers


EVAL_CACHE = Path(os.environ.get("COMPRESS_EVAL_CACHE", Path(__file__).resolve().parent.parent / ".cache/eval"))


def _primary(scores: dict) -> dict:
    """One headline number per task: acc for choice tasks, word perplexity for rolling ones."""
    return {t: m.get("acc", m.get("word_perplexity")) for t, m in scores.items()}


def speculative_report(teacher, student, prompts: list[torch.Tensor], cfg, *, show: bool = True) -> list[dict]:
    """One row per k. The teacher's greedy baseline runs once per prompt (shared by every k); a
    hopeless draft or a spent time budget stops the check early, and the rows say so."""
    deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
    graphs = cfg.graphs if cfg.graphs is not None else serves_graphs(teacher) and serves_graphs(student)
    baseline: dict = {}
    rows: list[dict] = []
    with tqdm(total=len(cfg.ks) * len(prompts), desc="speculative decoding (k x prompts)", disable=not show,
              dynamic_ncols=True) as bar:
        for k in cfg.ks:
            prev = rows[-1]["stopped"] if rows else None
            if prev:  # hopeless at a smaller k, or out of time: skip the rest, saying where it stopped
                why = prev if prev.startswith("skipped") else f"skipped ({prev.split(':')[0].split(' after')[0]} at k={rows[-1]['k']})"
                rows.append({"k": k, "n_prompts": 0, "stopped": why})
                bar.update(len(prompts))
                continue
            outputs: list[torch.Tensor] = []
            bar.set_postfix(k=k)
            stats = serve_prompts(teacher, student, prompts, k=k, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, baseline=baseline, deadline=deadline,
                                  hopeless_below=cfg.hopeless_acceptance, outputs=outputs, progress=bar,
                                  graphs=graphs)
            stats["graphs"] = graphs
            if cfg.compare_hf and cfg.temperature == 0:
                n = min(cfg.hf_prompts, len(outputs))
                assisted_generate_hf(teacher, student, prompts[0], 2, k=k)  # warm-up, untimed
                hf_time, tokens, same = 0.0, 0, True
                for p, ours in zip(prompts[:n], outputs):
                    start = time.perf_counter()
                    theirs = assisted_generate_hf(teacher, student, p, cfg.max_new_tokens, k=k)
                    hf_time += time.perf_counter() - start
                    tokens += theirs.numel()
                    same = same and torch.equal(ours, theirs)
                stats.update(hf_assisted_tokens_per_s=tokens / hf_time, hf_assisted_same_output=same, hf_prompts=n)
            rows.append(stats)
    return rows


def across_tokenizers_report(teacher, student, tokenizers: tuple, val_blocks: torch.Tensor, cfg) -> list[dict]:
    """One row per k for a student with its own tokenizer: the prompts are the held-out blocks'
    first ``prompt_tokens`` student tokens, as text, tokenized by the teacher."""
    t_tok, s_tok = tokenizers
    device = next(teacher.parameters()).device
    texts = [s_tok.decode(b[: cfg.prompt_tokens].tolist()) for b in val_blocks[-cfg.prompts:]]
    prompts = [torch.tensor([t_tok(t, add_special_tokens=False)["input_ids"]], device=device) for t in texts]
    deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
    baseline: dict = {}
    rows = []
    for k in cfg.ks:
        if rows and rows[-1]["stopped"]:
            rows.append({"k": k, "n_prompts": 0, "stopped": f"skipped (time budget spent at k={rows[-1]['k']})"})
            continue
        rows.append(serve_prompts_across_tokenizers(teacher, student, tokenizers, prompts, k=k,
                                                    max_new_tokens=cfg.max_new_tokens, baseline=baseline, deadline=deadline))
    return rows


def check_gates(gates, teacher_scores: dict, student_scores: dict, pair: dict, spec: list[dict]) -> list[dict]:
    """Each declared gate with its measured value and verdict."""
    out = []

    def add(name, value, threshold, ok):
        out.append({"gate": name, "value": value, "threshold": threshold, "passed": bool(ok)})

    if gates.bpb_ratio_max is not None and "bpb_ratio" not in pair:  # one tokenizer: per-token ppl says it
        add("bpb_ratio <= max (student shares the teacher's tokenizer: use ppl_ratio_max)", None, gates.bpb_ratio_max, False)
    elif gates.bpb_ratio_max is not None:
        add("bpb_ratio <= max", pair["bpb_ratio"], gates.bpb_ratio_max, pair["bpb_ratio"] <= gates.bpb_ratio_max)
    if gates.ppl_ratio_max is not None:
        add("ppl_ratio <= max", pair["ppl_ratio"], gates.ppl_ratio_max, pair["ppl_ratio"] <= gates.ppl_ratio_max)
    if gates.top1_min is not None:
        add("top1_agreement >= min", pair["top1_agreement"], gates.top1_min, pair["top1_agreement"] >= gates.top1_min)
    def acc_ratio(task: str | None, minimum: float) -> None:
        """student acc / teacher acc >= minimum; passes (no ratio) when the teacher scored 0."""
        if task is None or "acc" not in student_scores.get(task, {}):
            add(f"{task or 'mmlu'} acc / teacher >= min (task not run, or has no acc)", None, minimum, False)
        elif teacher_scores[task]["acc"] == 0:  # the student cannot be worse than 0
            add(f"{task} acc / teacher >= min (teacher scored 0)", None, minimum, True)
        else:
            ratio = student_scores[task]["acc"] / teacher_scores[task]["acc"]
            add(f"{task} acc / teacher >= min", ratio, minimum, ratio >= minimum)

    if gates.mmlu_min_ratio is not None:
        acc_ratio(next((t for t in student_scores if t.startswith("mmlu")), None), gates.mmlu_min_ratio)
    for task, minimum in gates.acc_min_ratio.items():
        acc_ratio(task, minimum)
    if gates.acceptance_min is not None:
        rate = spec[0]["acceptance_rate"] if spec else float("nan")
        add(f"acceptance_rate (k={spec[0]['k'] if spec else '?'}) >= min", rate, gates.acceptance_min,
            bool(spec) and rate >= gates.acceptance_min)
    return out


def failures(results: dict) -> list[str]:
    """What made ``results["passed"]`` false, one phrase per failed gate or inexact k."""
    failed = [f"{g['gate']} (measured {'none' if g['value'] is None else format(g['value'], '.4g')}, "
              f"threshold {g['threshold']})" for g in results["gates"] if not g["passed"]]
    # Greedy exactness is a property of the algorithm in exact arithmetic: in fp32 a mismatch is a
    # bug. In bf16 the verify pass (k tokens at once) and the target's one-token steps round
    # differently, so a near-tie can flip the argmax: that is reported (first_divergence), not failed.
    failed += [f"speculative k={r['k']} output differs from the teacher's (first at token {r.get('first_divergence')})"
               for r in results["speculative"] if r.get("exact_match") is False and r.get("dtype", "float32") == "float32"]
    return failed


def _fingerprint(model) -> str | None:
    """A hash of the weights (None for a partitioned ZeRO-3 model, whose shards are not all here)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if t.numel() == 0:
            return None
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def teacher_lm_eval(teacher, tokenizer, cfg, data: dict | None) -> tuple[dict, bool]:
    """The teacher's lm-eval scores, cached on disk: they depend only on its weights, the tasks (and
    their code) and the settings, and would otherwise cost as much as the student's every time."""
    from importlib.metadata import version

    from eval.harness import TASKS_DIR

    kw = dict(limit=cfg.limit, batch_size=cfg.batch_size, max_length=cfg.max_length, data=data)
    weights = _fingerprint(teacher)
    if weights is None:
        return run_lm_eval(teacher, tokenizer, cfg.tasks, **kw), False
    tasks_code = sorted((p.name, p.read_text()) for p in TASKS_DIR.iterdir() if p.suffix in (".py", ".yaml"))
    key = hashlib.sha256(json.dumps([weights, sorted(cfg.tasks), kw, tasks_code, version("lm_eval")],
                                    default=str).encode()).hexdigest()[:20]
    path = EVAL_CACHE / f"teacher-{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    scores = run_lm_eval(teacher, tokenizer, cfg.tasks, **kw)
    if scores:  # not on a lockstep rank that got no results back
        publish_file(path, lambda tmp: tmp.write_text(json.dumps(scores)))
    return scores, False


def evaluate_pair(student, teacher, tokenizer, cfg, val_blocks: torch.Tensor, *, student_dir=None,
                  device="cpu", data: dict | None = None, show: bool = True, teacher_tokenizer=None) -> dict:
    """Everything the eval stage and ``launch/evaluate.py`` report, as one JSON-able dict.

    ``data`` is the run's data section (``DataConfig.model_dump()``): our held-out text tasks
    score exactly the documents that training held out. ``results["seconds"]`` times each phase.
    With ``teacher_tokenizer`` (a student with its own tokenizer) the teacher runs lm-eval with
    its own, the pair is compared in bits per byte of the same text, and the speculative check
    serves the student through transformers' universal assisted generation (greedy only).
    """
    student.eval()
    teacher.eval()
    results = {"tasks": list(cfg.tasks), "limit": cfg.limit}
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    blocks = val_blocks[: cfg.eval_blocks]
    s_fn, t_fn = (lambda x: student(input_ids=x).logits), (lambda x: teacher(input_ids=x).logits)
    if teacher_tokenizer is None:
        pair = pair_metrics(s_fn, t_fn, blocks, batch_size=cfg.batch_size, device=device, progress=show)
    else:
        pair = pair_metrics(s_fn, None, blocks, batch_size=cfg.batch_size, device=device, progress=show)
        pair |= bits_per_byte(s_fn, t_fn, blocks, tokenizer, teacher_tokenizer, batch_size=cfg.batch_size, device=device)
    lap("teacher-relative metrics")
    t_scores, cached = teacher_lm_eval(teacher, teacher_tokenizer or tokenizer, cfg, data) if cfg.tasks else ({}, False)
    lap("lm-eval, teacher (cached)" if cached else "lm-eval, teacher")
    s_scores = run_lm_eval(student, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, data=data) if cfg.tasks else {}
    lap("lm-eval, student")
    results["teacher"] = {"params": param_count(teacher), "bytes": param_count(teacher) * next(teacher.parameters()).element_size(),
                          "lm_eval": t_scores, "ppl": pair.get("teacher_ppl"), "bpb": pair.get("teacher_bpb")}
    results["student"] = {"params": param_count(student),
                          "bytes": bytes_on_disk(student_dir) if student_dir else param_count(student) * next(student.parameters()).element_size(),
                          "lm_eval": s_scores, **pair}
    results["headline"] = {"teacher": _primary(t_scores), "student": _primary(s_scores)}
    spec = []
    if cfg.speculative is not None and teacher_tokenizer is not None and cfg.speculative.temperature > 0:
        results["speculative_skipped"] = ("student and teacher tokenizers differ: transformers' universal assisted "
                                          "generation, which serves such a draft, is run greedy only (temperature 0)")
    elif cfg.speculative is not None and teacher_tokenizer is not None:
        spec = across_tokenizers_report(teacher, student, (teacher_tokenizer, tokenizer), val_blocks, cfg.speculative)
        lap("speculative decoding (across tokenizers)")
    elif cfg.speculative is not None:
        sc = cfg.speculative
        prompts = [b[: sc.prompt_tokens].long().reshape(1, -1).to(device) for b in val_blocks[-sc.prompts:]]
        spec = speculative_report(teacher, student, prompts, sc, show=show)
        lap("speculative decoding")
    results["speculative"] = spec
    results["gates"] = check_gates(cfg.gates, t_scores, s_scores, pair, spec)
    results["failures"] = failures(results)
    results["passed"] = not results["failures"]
    results["seconds"] = {**seconds, "total": round(sum(seconds.values()), 2)}
    return results

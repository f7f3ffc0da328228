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

import time

import torch

from compress.export import bytes_on_disk
from compress.metrics import pair_metrics
from compress.models import param_count
from eval.harness import run_lm_eval
from eval.speculative import assisted_generate_hf, serve_prompts, speculative_generate


def _primary(scores: dict) -> dict:
    """One headline number per task: acc for choice tasks, word perplexity for rolling ones."""
    return {t: m.get("acc", m.get("word_perplexity")) for t, m in scores.items()}


def speculative_report(teacher, student, prompts: list[torch.Tensor], cfg) -> list[dict]:
    rows = []
    for k in cfg.ks:
        stats = serve_prompts(teacher, student, prompts, k=k, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature)
        if cfg.compare_hf and cfg.temperature == 0:
            assisted_generate_hf(teacher, student, prompts[0], 2, k=k)  # warm-up, untimed
            hf_time, tokens, same = 0.0, 0, True
            for p in prompts:
                ours = speculative_generate(teacher, student, p, max_new_tokens=cfg.max_new_tokens, k=k).tokens
                start = time.perf_counter()
                theirs = assisted_generate_hf(teacher, student, p, cfg.max_new_tokens, k=k)
                hf_time += time.perf_counter() - start
                tokens += theirs.numel()
                same = same and torch.equal(ours, theirs)
            stats.update(hf_assisted_tokens_per_s=tokens / hf_time, hf_assisted_same_output=same)
        rows.append(stats)
    return rows


def check_gates(gates, teacher_scores: dict, student_scores: dict, pair: dict, spec: list[dict]) -> list[dict]:
    """Each declared gate with its measured value and verdict."""
    out = []

    def add(name, value, threshold, ok):
        out.append({"gate": name, "value": value, "threshold": threshold, "passed": bool(ok)})

    if gates.ppl_ratio_max is not None:
        add("ppl_ratio <= max", pair["ppl_ratio"], gates.ppl_ratio_max, pair["ppl_ratio"] <= gates.ppl_ratio_max)
    if gates.top1_min is not None:
        add("top1_agreement >= min", pair["top1_agreement"], gates.top1_min, pair["top1_agreement"] >= gates.top1_min)
    if gates.mmlu_min_ratio is not None:
        task = next((t for t in student_scores if t.startswith("mmlu")), None)
        if task is None:
            add("mmlu acc / teacher >= min (no mmlu task was run)", None, gates.mmlu_min_ratio, False)
        elif teacher_scores[task]["acc"] == 0:  # no ratio to take: the student cannot be worse than 0
            add(f"{task} acc / teacher >= min (teacher scored 0)", None, gates.mmlu_min_ratio, True)
        else:
            ratio = student_scores[task]["acc"] / teacher_scores[task]["acc"]
            add(f"{task} acc / teacher >= min", ratio, gates.mmlu_min_ratio, ratio >= gates.mmlu_min_ratio)
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
               for r in results["speculative"] if r["exact_match"] is False and r.get("dtype", "float32") == "float32"]
    return failed


def evaluate_pair(student, teacher, tokenizer, cfg, val_blocks: torch.Tensor, *, student_dir=None,
                  device="cpu", data: dict | None = None) -> dict:
    """Everything the eval stage and ``launch/evaluate.py`` report, as one JSON-able dict.

    ``data`` is the run's data section (``DataConfig.model_dump()``): our held-out text tasks
    score exactly the documents that training held out.
    """
    student.eval()
    teacher.eval()
    results = {"tasks": list(cfg.tasks), "limit": cfg.limit}
    blocks = val_blocks[: cfg.eval_blocks]
    pair = pair_metrics(lambda x: student(input_ids=x).logits, lambda x: teacher(input_ids=x).logits, blocks,
                        batch_size=cfg.batch_size, device=device)
    t_scores = run_lm_eval(teacher, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size, max_length=cfg.max_length, data=data) if cfg.tasks else {}
    s_scores = run_lm_eval(student, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size, max_length=cfg.max_length, data=data) if cfg.tasks else {}
    results["teacher"] = {"params": param_count(teacher), "bytes": param_count(teacher) * next(teacher.parameters()).element_size(),
                          "lm_eval": t_scores, "ppl": pair["teacher_ppl"]}
    results["student"] = {"params": param_count(student),
                          "bytes": bytes_on_disk(student_dir) if student_dir else param_count(student) * next(student.parameters()).element_size(),
                          "lm_eval": s_scores, **pair}
    results["headline"] = {"teacher": _primary(t_scores), "student": _primary(s_scores)}
    spec = []
    if cfg.speculative is not None:
        sc = cfg.speculative
        prompts = [b[: sc.prompt_tokens].long().reshape(1, -1).to(device) for b in val_blocks[-sc.prompts:]]
        spec = speculative_report(teacher, student, prompts, sc)
    results["speculative"] = spec
    results["gates"] = check_gates(cfg.gates, t_scores, s_scores, pair, spec)
    results["failures"] = failures(results)
    results["passed"] = not results["failures"]
    return results

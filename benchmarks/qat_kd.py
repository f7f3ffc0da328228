"""Weight quantization on the real teacher: RTN vs GPTQ vs QAT with CE vs QAT with KD (from round
to nearest or from GPTQ), in every format (int8, int4 g64/g32, FP8, NVFP4, MXFP4), over seeds.

    .venv/bin/python benchmarks/qat_kd.py [--arms rtn_int4_g64,qat_kd_int4_g64,...] [--seeds 0,1,2] [--jobs 1]

Arms: ``rtn_<f>`` and ``qat_kd_<f>`` for every format f in FORMATS, ``gptq_<f>`` and
``qat_kd_gptq_<f>`` for the 4-bit ones, block-wise reconstruction (``*blockwise*``, after round to
nearest or GPTQ, as PTQ and as QAT's start), ``qat_ce_int4_g64``, ``qat_kd_gptq_lsq_int4_g64`` (scales
trained, LSQ; ``..._lsq_blockwise_...``: block-wise too, EfficientQAT's recipe), ``rtn_mse_<f>`` /
``gptq_mse_<f>`` (the mse observer: each block's range shrunk to its least squared error), ``awq_*``
(AWQ's scales first: ``awq_rtn_<f>``, ``awq_gptq_<f>``, ``..._blockwise_...``, ``qat_kd_awq_...``) and a few
W8A8 / KV-cache PTQ settings (``--help`` lists them).

Every arm is a real run of launch/distill.py on the default recipe with the student a full copy of
the teacher (`student.init: teacher`) and one quantization stage; training arms take 150 steps x
8 x 128 tokens (the issue's budget, 150 x 1,024 tokens) at lr 5e-5 (warmup 10, cosine to 10%).
RTN arms do not train (their seed changes nothing). Metrics against the fp teacher on held-out
Python docs: perplexity ratio, KL, top-1 agreement, and bytes on disk of the compressed-tensors
export. Goals (issue 14): int4 g64 QAT-KD reaches ppl ratio <= 1.05, KL <= 0.17, top-1 >= 0.80,
and recovers >= 90% of RTN's gap in perplexity and in KL; claims only beyond the seed spread.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import (DEFAULT_RECIPE, EQUAL_TOKENS, against_goal, arm_stats, arms_markdown,  # noqa: E402
                               blockwise, compare, pm, run_sweep, sweep_arguments, sweep_payload, write_results)

RECIPE = DEFAULT_RECIPE
W4 = "weights: {bits: 4, group_size: 64}"
TRAIN = EQUAL_TOKENS
TRAIN_600 = [*TRAIN, "train.max_steps=600", "train.eval_every=150"]  # 4x the tokens, evaluated every 150 steps
GPTQ = "method: gptq, gptq: {calibration_blocks: 128}"  # 128 x 128 = 16k calibration tokens
BLOCKWISE = blockwise()  # each layer trained towards the teacher's output, same 16k tokens
BLOCKWISE_LR = {"lr3e-4": blockwise("3.0e-4"), "lr1e-3": blockwise("1.0e-3")}  # arm tag -> option (default lr 1e-4)
# block-wise on more calibration text (512 blocks: 64k tokens) and for more epochs: arm tag -> option
BLOCKWISE_MORE = {"blockwise512": blockwise(blocks=512), "blockwise512e4": blockwise(blocks=512, epochs=4)}
KV8 = "kv_cache: {format: fp8, per_head: true}"
AWQ = "awq: {calibration_blocks: 128}"  # AWQ's scales searched on the same 16k tokens, before RTN / GPTQ
AWQ_SCALES = {kind: f"awq: {{calibration_blocks: 128, scales: {kind}}}" for kind in ("duo", "both")}


def ptq(weights: str, extra: str = "") -> tuple[str, str]:
    return "{init: teacher}", f"[{{kind: quantize, weights: {{{weights}}}{', ' + extra if extra else ''}}}]"


# every format the qat / quantize stages take, as its `weights:` mapping
FORMATS = {"int8": "bits: 8, group_size: null", "int4_g64": "bits: 4, group_size: 64",
           # asymmetric: an int8 zero point per group too, and exported dequantized (see WeightQuant.export)
           "int4_g64_asym": "bits: 4, group_size: 64, symmetric: false, export: dequantized",
           "int4_g32": "bits: 4, group_size: 32", "fp8": "format: fp8", "nvfp4": "format: nvfp4",
           "mxfp4": "format: mxfp4"}
FOUR_BIT = ("int4_g64", "int4_g64_asym", "int4_g32", "nvfp4", "mxfp4")  # where GPTQ and QAT from GPTQ are worth an arm
INT4_G64 = ("int4_g64", "int4_g64_asym")  # what the int4 g64 goals are for


def qat(weights: str, extra: str = "") -> tuple[str, str, list[str]]:
    return "{init: teacher}", f"[{{kind: qat, weights: {{{weights}}}{', ' + extra if extra else ''}}}]", TRAIN


ARMS = {
    **{f"rtn_{f}": ptq(w) for f, w in FORMATS.items()},
    **{f"gptq_{f}": ptq(FORMATS[f], GPTQ) for f in FOUR_BIT},
    # block-wise reconstruction after round to nearest / after GPTQ (compress.blockwise)
    "blockwise_int4_g64": ptq(FORMATS["int4_g64"], BLOCKWISE),
    "gptq_blockwise_int4_g64": ptq(FORMATS["int4_g64"], f"{GPTQ}, {BLOCKWISE}"),
    **{f"gptq_blockwise_{tag}_int4_g64": ptq(FORMATS["int4_g64"], f"{GPTQ}, {b}") for tag, b in BLOCKWISE_LR.items()},
    # the mse observer (each block's range shrunk to its least squared error), for round to nearest and GPTQ
    **{f"rtn_mse_{f}": ptq(f"{FORMATS[f]}, observer: mse") for f in FOUR_BIT},
    **{f"gptq_mse_{f}": ptq(f"{FORMATS[f]}, observer: mse", GPTQ) for f in FOUR_BIT},
    # AWQ's scales (compress.awq) before round to nearest / GPTQ / GPTQ + block-wise, and as QAT's start
    **{f"awq_rtn_{f}": ptq(FORMATS[f], AWQ) for f in FOUR_BIT},
    **{f"awq_gptq_{f}": ptq(FORMATS[f], f"{AWQ}, {GPTQ}") for f in FOUR_BIT},
    **{f"awq_{k}_{m}_int4_g64": ptq(FORMATS["int4_g64"], a + (f", {GPTQ}" if m == "gptq" else ""))
       for k, a in AWQ_SCALES.items() for m in ("rtn", "gptq")},
    **{f"awq_gptq_mse_{f}": ptq(f"{FORMATS[f]}, observer: mse", f"{AWQ}, {GPTQ}") for f in FOUR_BIT},
    "awq_gptq_blockwise_int4_g64": ptq(FORMATS["int4_g64"], f"{AWQ}, {GPTQ}, {BLOCKWISE}"),
    **{f"awq_gptq_{tag}_int4_g64": ptq(FORMATS["int4_g64"], f"{AWQ}, {GPTQ}, {b}") for tag, b in BLOCKWISE_MORE.items()},
    # other post-training settings (no training: one seed says it all)
    "rtn_w8a8_fp8": ptq("format: fp8, activations: fp8"),
    "rtn_w8a8_int8": ptq("bits: 8, group_size: null, activations: int8"),
    "rtn_w8a8_fp8_kv_fp8": ptq("format: fp8, activations: fp8", KV8),
    "rtn_int8_kv_fp8": ptq("bits: 8, group_size: null", KV8),
    # QAT: with CE only, with KD from round to nearest, with KD from GPTQ's latent weights (its scales
    # held fixed), and for int4 g64 with its scales trained from GPTQ's (LSQ)
    "qat_ce_int4_g64": qat(FORMATS["int4_g64"], "kd_weight: 0.0, ce_weight: 1.0"),
    **{f"qat_kd_{f}": qat(w) for f, w in FORMATS.items()},
    **{f"qat_kd_gptq_{f}": qat(FORMATS[f], GPTQ) for f in FOUR_BIT},
    "qat_kd_gptq_lsq_int4_g64": qat("bits: 4, group_size: 64, learn_scales: true", GPTQ),
    # EfficientQAT's whole recipe: GPTQ's start, block-wise training of weights and scales (Block-AP), then
    # QAT-KD with the scales still trained
    "qat_kd_gptq_lsq_blockwise_int4_g64": qat("bits: 4, group_size: 64, learn_scales: true", f"{GPTQ}, {BLOCKWISE}"),
    # QAT-KD from block-wise reconstruction (after round to nearest / after GPTQ)
    "qat_kd_blockwise_int4_g64": qat(FORMATS["int4_g64"], BLOCKWISE),
    **{f"qat_kd_gptq_blockwise_{f}": qat(FORMATS[f], f"{GPTQ}, {BLOCKWISE}") for f in INT4_G64},
    **{f"qat_kd_awq_gptq_blockwise_{f}": qat(FORMATS[f], f"{AWQ}, {GPTQ}, {BLOCKWISE}") for f in INT4_G64},
    **{f"qat_kd_awq_gptq_{tag}_int4_g64": qat(FORMATS["int4_g64"], f"{AWQ}, {GPTQ}, {b}")
       for tag, b in BLOCKWISE_MORE.items()},
    "qat_kd_gptq_mse_blockwise_int4_g64": qat(f"{FORMATS['int4_g64']}, observer: mse", f"{GPTQ}, {BLOCKWISE}"),
    **{f"qat_kd_gptq_blockwise_{tag}_int4_g64": qat(FORMATS["int4_g64"], f"{GPTQ}, {b}")
       for tag, b in BLOCKWISE_LR.items()},
    # the same as qat_kd_gptq_int4_g64 and qat_kd_gptq_blockwise_int4_g64 on 4x the tokens (600 steps,
    # evaluated every 150): what the recovery goal costs
    "qat_kd_gptq_int4_g64_600": (*qat(FORMATS["int4_g64"], GPTQ)[:2], TRAIN_600),
    "qat_kd_gptq_blockwise_int4_g64_600": (*qat(FORMATS["int4_g64"], f"{GPTQ}, {BLOCKWISE}")[:2], TRAIN_600),
}
METRICS = {"ppl_ratio": ("ppl_ratio", "lower"), "kl": ("kl", "lower"), "top1_agreement": ("top1_agreement", "higher"),
           "ppl": ("student_ppl", "lower")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(ap, list(ARMS), list(ARMS), "runs/bench_qat_kd", "qat_kd")
    args = ap.parse_args()
    results, plans, wall = run_sweep(ARMS, RECIPE, args)
    stats = arm_stats(results, METRICS)
    verdict = _verdict(stats)
    curves = _curves(results, plans)
    md = _markdown(args, stats, verdict, wall, results) + _curves_markdown(curves)
    payload = sweep_payload(args, wall, ARMS, results, stats, verdict, curves=curves)
    write_results(args.tag, payload, md)
    return 0


def _curves(results: dict, plans: dict) -> dict:
    """{arm: {seed: [{step, ppl_ratio, kl, top1_agreement}, ...]}} of the runs evaluated during
    training (the ``_600`` arms, every 150 steps), from each run's metrics.jsonl; the PTQ start
    (the transform's metrics) is step 0."""
    from compress.tracking import read_metrics

    out = {}
    for (a, s), (folder, _, _) in plans.items():
        if s not in results[a] or "page" in results[a][s]:
            continue
        points = [{"step": r["step"], **{m: r[f"{pre}/{m}"] for m in ("ppl_ratio", "kl", "top1_agreement")}}
                  for r in read_metrics(REPO / folder) for pre in ("transformed", "eval") if f"{pre}/kl" in r]
        if len(points) > 2:  # a start and more than the final evaluation
            out.setdefault(a, {})[s] = points
    return out


def _curves_markdown(curves: dict) -> str:
    if not curves:
        return ""
    from compress.tracking import format_table

    rows = [{"arm": a, "seed": s, **p} for a, by in curves.items() for s, pts in by.items() for p in pts]
    return ("\nDuring training (held-out metrics at each evaluation; step 0 is the PTQ start):\n\n"
            + format_table(rows, ["arm", "seed", "step", "ppl_ratio", "kl", "top1_agreement"]) + "\n")


def format_of(arm: str) -> str | None:
    """The FORMATS key an arm quantizes to (its name ends with it, before a ``_600`` budget tag)."""
    return max((f for f in FORMATS if arm.removesuffix("_600").endswith(f)), key=len, default=None)


def _verdict(stats: dict) -> dict:
    """The issue's goals for int4 g64 QAT-KD (from round to nearest and from GPTQ), and for every
    QAT-KD arm the share of its format's RTN gap it recovers (goal 90%, ppl ratio and KL)."""
    v = {}
    goal_arms = [a for a in stats if a.startswith("qat_kd_") and format_of(a) in INT4_G64 and not a.endswith("_600")]
    for arm in goal_arms:
        for m, goal, better in (("ppl_ratio", 1.05, "lower"), ("kl", 0.17, "lower"), ("top1_agreement", 0.80, "higher")):
            v[f"{arm} {m} goal {goal}"] = against_goal(stats[arm][m], goal, better)
    for arm, st in ((a, st) for a, st in stats.items() if a.startswith("qat_kd_")):
        fmt = format_of(arm)
        rtn = stats.get(f"rtn_{fmt}")
        if rtn is None:
            continue
        for m, base in (("ppl_ratio", 1.0), ("kl", 0.0)):
            rec = (rtn[m]["mean"] - st[m]["mean"]) / (rtn[m]["mean"] - base)
            v[f"{arm} recovers >= 90% of rtn_{fmt}'s {m} gap"] = \
                f"{'met' if rec >= 0.9 else 'not met'} ({rec:.0%} of the means)"
    kd = stats.get("qat_kd_int4_g64")
    if kd is not None and "qat_ce_int4_g64" in stats:
        for m in ("kl", "top1_agreement", "ppl_ratio"):
            v[f"QAT-KD vs QAT-CE, {m}"] = f"{compare(kd[m], stats['qat_ce_int4_g64'][m], METRICS[m][1])} " \
                                         f"({pm(kd[m])} vs {pm(stats['qat_ce_int4_g64'][m])})"
    return v


def _markdown(args, stats: dict, verdict: dict, wall: float, results: dict) -> str:
    kv_values = 2 * 30 * 3 * 64  # K and V, per token: layers x KV heads x head_dim of SmolLM2-135M
    for a, st in stats.items():
        st["kv_bytes"] = kv_values * (1 if "kv_cache" in ARMS[a][1] else 2)
    teacher = {"arm": "teacher (fp32)", "ppl_ratio": "1", "kl": "0", "top1_agreement": "1",
               "bytes": next(iter(stats.values()))["teacher_bytes"] if stats else None, "kv_bytes/token": kv_values * 2}
    return arms_markdown("Weight quantization of SmolLM2-135M-Instruct against its fp teacher, held-out Python docs",
                         "qat_kd.py", args, stats, METRICS, verdict, wall, results,
                         "Mean ± sample std over seeds (RTN arms do not train: their seeds agree).",
                         {"bytes": "bytes", "kv_bytes/token": "kv_bytes"}, teacher)


if __name__ == "__main__":
    sys.exit(main())

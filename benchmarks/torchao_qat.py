"""The peer QAT beside ours: torchao's int4 g64 fake quantization, trained with CE in a plain
PyTorch loop on exactly the tokens our QAT arms see, measured on the same held-out blocks.

    pip install --no-deps --target .cache/torchao torchao==0.18.0     # not a dependency of ours
    PYTHONPATH=.cache/torchao .venv/bin/python benchmarks/torchao_qat.py [--seeds 0] [--lr 5e-5]

What it shares with ``benchmarks/qat_kd.py``'s ``qat_*_int4_g64`` arms: the teacher
(SmolLM2-135M-Instruct, fp32), the student (a full copy of it), the targets (the seven
projections; embeddings and lm_head kept), the batches (``compress.data.sample_indices``: the
same blocks in the same order at every step), the budget (150 steps x 8 x 128 tokens), the
schedule (AdamW, warmup 10, cosine to 10%, clip 1.0, our weight-decay groups) and the metrics
(``compress.metrics.pair_metrics`` on the first ``train.eval_blocks`` held-out blocks). What is
torchao's: the fake quantizer (``QATConfig(IntxFakeQuantizeConfig(int4, group_size=64))``,
``step="prepare"``) and its convert (``IntxWeightOnlyConfig``), whose model is the one measured;
the fake-quant model's metrics are reported beside it (torchao's own prepare/convert parity).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import DEFAULT_RECIPE, EQUAL_TOKENS, mean_std, pm, write_results  # noqa: E402
from compress.methods.qat import PROJECTIONS  # noqa: E402  (the qat stage's default targets)
from compress.tracking import format_table  # noqa: E402


def torchao_modules():
    try:
        import torchao
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        sys.exit("error: torchao is not importable; install it apart from our venv with `pip install --no-deps "
                 "--target .cache/torchao torchao==0.18.0` and run with PYTHONPATH=.cache/torchao")
    return torchao.__version__, quantize_, QATConfig, IntxFakeQuantizeConfig, IntxWeightOnlyConfig, PerGroup


def run(seed: int, lr: float, group: int, recipe, teacher, data, eval_blocks) -> dict:
    from compress.data import sample_indices
    from compress.metrics import pair_metrics
    from compress.train import lr_lambda, make_optimizer

    version, quantize_, QATConfig, FakeQuant, WeightOnly, PerGroup = torchao_modules()
    tr = recipe.train
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    is_target = lambda m, name: isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS  # noqa: E731
    fq = FakeQuant(torch.int4, group_size=group, is_symmetric=True)
    quantize_(student, QATConfig(weight_config=fq, step="prepare"), filter_fn=is_target)
    tr = tr.model_copy(update={"lr": lr})
    opt = make_optimizer(student, tr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr, tr.max_steps))
    batch_size = tr.micro_batch_size * tr.grad_accum
    t0, losses = time.time(), []
    for step in range(tr.max_steps):
        idx = sample_indices(seed, step, len(data.train), batch_size)
        opt.zero_grad(set_to_none=True)
        for micro in range(tr.grad_accum):
            b = data.batch(idx[micro * tr.micro_batch_size:(micro + 1) * tr.micro_batch_size])
            logits = student(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten()) / tr.grad_accum
            loss.backward()
            losses.append(float(loss) * tr.grad_accum)
        torch.nn.utils.clip_grad_norm_(student.parameters(), tr.grad_clip)
        opt.step()
        sched.step()
        if step % tr.log_every == 0 or step == tr.max_steps - 1:
            print(f"seed {seed} step {step}/{tr.max_steps} ce {losses[-1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    student.eval()
    metrics = {}
    with torch.no_grad():
        t_logits = lambda x: teacher(input_ids=x).logits  # noqa: E731
        metrics["fake_quant"] = pair_metrics(lambda x: student(input_ids=x).logits, t_logits, eval_blocks,
                                             batch_size=tr.micro_batch_size)
        quantize_(student, QATConfig(WeightOnly(weight_dtype=torch.int4, granularity=PerGroup(group)), step="convert"),
                  filter_fn=is_target)
        metrics["converted"] = pair_metrics(lambda x: student(input_ids=x).logits, t_logits, eval_blocks,
                                            batch_size=tr.micro_batch_size)
    return {"torchao": version, "train_seconds": train_s, "final_ce": losses[-1], **metrics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lr", type=float, default=5e-5, help="our QAT arms' lr (the issue's peer figure used 1e-5)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--tag", default="torchao_qat")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override (e.g. train.max_steps=2)")
    args = ap.parse_args()

    from compress.data import prepare_data
    from compress.models import load_model, load_tokenizer
    from compress.recipe import load_recipe

    recipe = load_recipe(DEFAULT_RECIPE, [*EQUAL_TOKENS, *args.set])
    tok = load_tokenizer(recipe.teacher.source)
    teacher = load_model(recipe.teacher.source).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = prepare_data(recipe.data, tok)
    eval_blocks = data.val[: recipe.train.eval_blocks]
    t0 = time.time()
    results = {s: run(s, args.lr, args.group, recipe, teacher, data, eval_blocks) for s in map(int, args.seeds.split(","))}
    wall = time.time() - t0
    rows, stats = [], {}
    for which in ("converted", "fake_quant"):
        stats[which] = {m: mean_std([r[which][m] for r in results.values()])
                        for m in ("ppl_ratio", "kl", "top1_agreement", "student_ppl")}
        rows.append({"model": f"torchao QAT-CE int4 g{args.group}, {which.replace('_', '-')}", "seeds": len(results),
                     **{m: pm(v) for m, v in stats[which].items()}})
    version = next(iter(results.values()))["torchao"]
    md = "\n".join([
        f"torchao {version} QAT (CE) on the tokens of our QAT arms; seeds {args.seeds}; lr {args.lr}; "
        f"{recipe.train.max_steps} steps x {recipe.train.micro_batch_size} x {recipe.data.block_size} tokens.",
        f"Command: PYTHONPATH=.cache/torchao .venv/bin/python benchmarks/torchao_qat.py --seeds {args.seeds} "
        f"--lr {args.lr} --group {args.group}" + "".join(f" --set {x}" for x in args.set),
        f"Wall time: {wall / 60:.1f} min on {'cuda' if torch.cuda.is_available() else 'cpu'} (fp32). Held-out: the first "
        f"{len(eval_blocks)} validation blocks, as our runs' final metrics. Mean ± sample std over seeds.", "",
        format_table(rows, ["model", "seeds", "ppl_ratio", "kl", "top1_agreement", "student_ppl"]), ""])
    payload = {"args": vars(args), "wall_s": wall, "results": {str(k): v for k, v in results.items()}, "summary": stats}
    write_results(args.tag, payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

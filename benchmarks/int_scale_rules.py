"""How a symmetric int format picks each group's scale, measured on the real teacher: round to
nearest with four rules, same grid (int4: -8..7), same groups, same bf16-rounded scales.

    .venv/bin/python benchmarks/int_scale_rules.py [--group-size 64] [--blocks 48]

Rules (m: the group's largest-magnitude value; hi, lo: its largest and smallest values):
  absmax/qmax      max|W| / 7        the usual one: -8 is never used, nothing clips
  no-clip          max(hi / 7, lo / -8)   the smallest scale that clips nothing
  ours             |m| / 7 if m > 0 else |m| / 8   m lands on the grid's end on its side; the other
                   sign clips by < 1 step (compress.quant, GGUF's Q4_0)
  absmax/7.5       max|W| / 7.5      torchao's and compressed-tensors' symmetric observer: m clips by
                   half a step
Every linear of every decoder layer is quantized (lm_head and embeddings stay float), as the
`quantize` stage's default. Metrics against the fp teacher on the default recipe's held-out blocks
(the first ``--blocks`` of 128 tokens, the runs' eval_blocks): perplexity ratio, KL, top-1
agreement. No training, no seed: one pass per rule (about a minute each on 2 CPU cores).
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from benchmarks.common import write_results  # noqa: E402
from compress.methods.qat import PROJECTIONS  # noqa: E402
from compress.quant import IntSpec, _qparams, int_round, representable  # noqa: E402


def _hi_lo(wg):
    return wg.amax(-1).clamp(min=0), -wg.amin(-1).clamp(max=0)


RULES = {
    "absmax/qmax": lambda wg, s: torch.maximum(*_hi_lo(wg)) / s.qmax,
    "no-clip": lambda wg, s: torch.maximum(_hi_lo(wg)[0] / s.qmax, _hi_lo(wg)[1] / -s.qmin),
    "ours": lambda wg, s: _qparams(wg, s)[0],
    "absmax/7.5": lambda wg, s: torch.maximum(*_hi_lo(wg)) / ((s.qmax - s.qmin) / 2),
}


@torch.no_grad()
def round_to_nearest(model, spec: IntSpec, rule) -> None:
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                w = m.weight.float()
                wg = w.reshape(len(w), -1, spec.group_size)
                scale = rule(wg, spec)
                scale = representable(torch.where(scale > 0, scale, torch.ones_like(scale)), spec.scale_dtype)[..., None]
                m.weight.copy_((int_round(wg, scale, 0, spec) * scale).reshape(w.shape))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--tag", default="int_scale_rules")
    args = ap.parse_args()

    from compress.data import prepare_data
    from compress.metrics import pair_metrics
    from compress.models import load_model, load_tokenizer
    from compress.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/smollm2_distill.yaml", [])
    source = recipe.teacher.source
    val = prepare_data(recipe.data, load_tokenizer(source)).val[: args.blocks]
    teacher = load_model(source).eval()
    with torch.no_grad():
        logits = [teacher(val[i : i + 8, :-1].long()).logits for i in range(0, len(val), 8)]
    spec = IntSpec(4, args.group_size, True)
    rows = []
    for name, rule in RULES.items():
        t0 = time.time()
        model = load_model(source).eval()
        round_to_nearest(model, spec, rule)
        cached = iter(logits)
        with torch.no_grad():
            m = pair_metrics(lambda x: model(x).logits, lambda x: next(cached), val)
        rows.append({"rule": name, **{k: m[k] for k in ("ppl_ratio", "kl", "top1_agreement")}})
        print(f"{name}: {rows[-1]} ({time.time() - t0:.0f} s)", flush=True)
    md = (f"Round to nearest, int4 g{args.group_size} symmetric, SmolLM2-135M-Instruct against its fp weights, "
          f"{len(val)} held-out blocks of {val.shape[1] - 1} tokens; the rule that picks each group's scale.\n"
          f"Command: .venv/bin/python benchmarks/int_scale_rules.py --group-size {args.group_size} --blocks {args.blocks}\n\n"
          "| rule | ppl_ratio | kl | top1_agreement |\n|---|---|---|---|\n"
          + "".join(f"| {r['rule']} | {r['ppl_ratio']:.4g} | {r['kl']:.4g} | {r['top1_agreement']:.4g} |\n" for r in rows))
    write_results(args.tag, {"args": vars(args), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

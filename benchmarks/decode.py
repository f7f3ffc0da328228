"""End-to-end decode: the teacher vs compressed exports served on our kernels, and each export as
the teacher's speculative draft.

    python benchmarks/decode.py --exports int4=runs/a/final,s24int4=runs/b/final \
        [--teacher smollm2-135m-instruct] [--prompts 4] [--prompt-tokens 128] [--new-tokens 128] [--ks 2,4]

Each model decodes greedily at batch 1 with a KV cache (``eval.speculative.greedy_generate``), one
prompt after another, prompts being held-out text (the default data split's validation blocks).
Exports load with ``eval.kernel_model.load_kernel_model``: every quantized or 2:4 linear runs on
our Triton kernels on CUDA (their PyTorch references elsewhere, so CPU numbers say nothing about
the kernels). bf16 on CUDA, fp32 on CPU. Then each export drafts for the teacher
(``serve_prompts``, greedy): acceptance, speedup over the teacher alone, exact match. The issue's
goal: a distilled, quantized draft at >= 2x the teacher's tokens/s, output greedy-exact.

On the lent GPU machine (scripts/device_payload.sh carries the teacher and deepspeed): make the
exports with two PTQ runs first, e.g. `launch/distill.py --recipe recipes/smollm2_distill.yaml
'student={init: teacher}' 'stages=[{kind: quantize, weights: {bits: 4, group_size: 64}}]'
output_dir=runs/int4`, and the same with `[{kind: sparsify}, {kind: quantize, ...}]` for 2:4 x int4
(seconds each on a GPU). Checked on CPU with a real int4 export (the reference path).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def decode_speed(model, prompts, new_tokens: int, device) -> dict:
    import torch

    from eval.speculative import greedy_generate

    greedy_generate(model, prompts[0], 4)  # warm-up (and, on CUDA, the kernels' autotuning)
    tokens, seconds = 0, 0.0
    for p in prompts:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = greedy_generate(model, p, new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += out.numel()
    return {"tokens_per_s": tokens / seconds, "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exports", required=True, help="name=folder,... (our exports)")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--tag", default=None, help="results name (default: decode_<device>)")
    args = ap.parse_args()
    import torch

    from benchmarks.common import write_results
    from compress.data import prepare_data
    from compress.models import load_model, load_tokenizer
    from compress.recipe import DataConfig
    from compress.tracking import format_table
    from eval.kernel_model import load_kernel_model
    from eval.speculative import serve_prompts

    exports = dict(item.split("=", 1) for item in args.exports.split(","))
    for name, folder in exports.items():
        if not (Path(folder) / "config.json").is_file():
            sys.exit(f"error: export {name}={folder} has no config.json; give the final/ folder of a run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = load_tokenizer(args.teacher)
    val = prepare_data(DataConfig(), tok).val
    prompts = [b[: args.prompt_tokens].long().reshape(1, -1).to(device) for b in val[: args.prompts]]
    teacher = load_model(args.teacher, dtype).to(device).eval()
    teacher.config.use_cache = True
    rows = [{"model": "teacher", **decode_speed(teacher, prompts, args.new_tokens, device)}]
    base = rows[0]["tokens_per_s"]
    spec_rows = []
    for name, folder in exports.items():
        model = load_kernel_model(folder, dtype, device)
        model.config.use_cache = True
        row = {"model": name, "kernel modules": getattr(model.config, "kernel_modules", 0),
               **decode_speed(model, prompts, args.new_tokens, device)}
        rows.append(row | {"speedup vs teacher": row["tokens_per_s"] / base})
        for k in (int(v) for v in args.ks.split(",")):
            s = serve_prompts(teacher, model, prompts, k=k, max_new_tokens=args.new_tokens)
            spec_rows.append({"draft": name, **{c: s[c] for c in ("k", "acceptance_rate", "mean_accepted_per_pass",
                                                                  "target_tokens_per_s", "spec_tokens_per_s", "speedup",
                                                                  "exact_match")}})
        print(rows[-1], spec_rows[-1], flush=True)
        del model
    rows[0]["speedup vs teacher"] = 1.0
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (kernels' PyTorch references: not a speed claim)"
    md = "\n".join([
        f"Greedy decode at batch 1, {args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
        f"tokens each, {str(dtype).removeprefix('torch.')}, on {label}.",
        f"Command: python benchmarks/decode.py --exports {args.exports} --teacher {args.teacher} --prompts {args.prompts} "
        f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens} --ks {args.ks}", "",
        format_table(rows, ["model", "kernel modules", "tokens_per_s", "speedup vs teacher"]), "",
        "Each export as the teacher's draft (speculative decoding, greedy):", "",
        format_table(spec_rows, list(spec_rows[0])) if spec_rows else "", ""])
    tag = args.tag or f"decode_{'cuda' if device.type == 'cuda' else 'cpu'}"
    write_results(tag, {"args": vars(args), "device": label, "rows": rows, "speculative": spec_rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

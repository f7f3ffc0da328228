"""Evaluate a compressed model against its teacher.

    python launch/evaluate.py --model runs/smollm2-distill/final --teacher smollm2-135m-instruct \
        [--tasks pydocs_cloze_quick,pydocs_ppl_quick] [--limit 50] [--k 2,4,6] [--out DIR] \
        [--gate ppl_ratio_max=1.3 --gate acceptance_min=0.6]

Writes <out>/eval.json and <out>/report.md (+ figures/), prints the tables. Exit status: 0 when
every gate passes, 3 when one fails, 2 on bad input (checked before any model loads).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def export_data_config(model_dir: str):
    """The data settings the model was trained with (its compression.json), else the defaults:
    held-out metrics must score only documents that training held out."""
    from compress.recipe import DataConfig

    info = Path(model_dir) / "compression.json"
    data = json.loads(info.read_text()).get("recipe", {}).get("data") if info.is_file() else None
    return DataConfig.model_validate(data) if data else DataConfig()


def build_config(args):
    from compress.errors import CompressError
    from eval.stage import EvalStage

    spec = None
    if not args.no_spec:
        spec = {"ks": [int(k) for k in args.k.split(",")], "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "compare_hf": not args.no_hf_compare,
                "time_budget_s": args.time_budget or None}
    gates = {}
    for g in args.gate:
        name, sep, value = g.partition("=")
        if not sep:
            raise CompressError(f"--gate {g!r} is not name=value; e.g. --gate ppl_ratio_max=1.3")
        if name.startswith("acc_min_ratio."):  # per task: --gate acc_min_ratio.TASK=0.9
            gates.setdefault("acc_min_ratio", {})[name.split(".", 1)[1]] = value
        else:
            gates[name] = value
    raw = {"tasks": [t for t in args.tasks.split(",") if t], "limit": args.limit, "batch_size": args.batch_size,
           "eval_blocks": args.eval_blocks, "speculative": spec, "gates": gates}
    from pydantic import ValidationError

    try:
        return EvalStage.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise CompressError(f"bad evaluation option `{key}`: {e['msg']}; see --help") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export folder (HF format) of the compressed model")
    ap.add_argument("--teacher", default="smollm2-135m-instruct", help="HF folder, .gguf file or alias")
    from eval.stage import DEFAULT_TASKS, SpeculativeCheck

    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval tasks ('' for none)")
    ap.add_argument("--limit", type=float, default=None, help="examples per task (count, or fraction < 1)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks for ppl / agreement / KL")
    ap.add_argument("--k", default="2,4,6", help="speculative draft lengths")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--time-budget", type=float, default=SpeculativeCheck().time_budget_s,
                    help="seconds the speculative check may take before it stops serving prompts (0: none, "
                         "every prompt is served)")
    ap.add_argument("--no-hf-compare", action="store_true", help="skip timing transformers' assisted generation")
    ap.add_argument("--no-spec", action="store_true", help="skip the speculative-decoding check")
    ap.add_argument("--kernels", action="store_true", help="run the student's quantized / 2:4 linears on our kernels "
                    "(kernels.modules; the PyTorch reference of the same math off CUDA): judged as served")
    ap.add_argument("--gate", action="append", default=[], help="e.g. ppl_ratio_max=1.3, mmlu_min_ratio=0.95, "
                    "top1_min=0.8, acceptance_min=0.6, acc_min_ratio.TASK=0.9 (repeatable)")
    ap.add_argument("--out", default=None, help="output folder (default: <model>/eval)")
    args = ap.parse_args(argv)

    from compress.errors import CompressError

    try:
        from compress.models import load_tokenizer, resolve_source, shared_vocab
        from eval.harness import check_tasks

        cfg = build_config(args)
        resolve_source(args.model)
        resolve_source(args.teacher)
        tokenizer, own = load_tokenizer(args.teacher), load_tokenizer(args.model)
        try:
            shared_vocab(tokenizer, own)
            teacher_tokenizer = None
        except CompressError as e:  # a student with its own tokenizer: compared in bits per byte
            token_gates = cfg.gates.token_level()
            if token_gates:
                raise CompressError(f"{str(e).split(';')[0]}: the gates {token_gates} compare them token by token; "
                                    "use --gate bpb_ratio_max=...") from None
            tokenizer, teacher_tokenizer = own, tokenizer
        if teacher_tokenizer is None and cfg.gates.bpb_ratio_max is not None:
            raise CompressError("--gate bpb_ratio_max is for a student with its own tokenizer; this one shares "
                                "the teacher's: use --gate ppl_ratio_max")
        check_tasks(cfg.tasks)
        from eval.tasks.utils import check_task_data

        data_cfg = export_data_config(args.model)
        check_task_data(cfg.tasks, data_cfg.model_dump(mode="json"))
        return run(args, cfg, tokenizer, data_cfg, teacher_tokenizer)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, cfg, tokenizer, data_cfg, teacher_tokenizer=None) -> int:
    import torch

    from compress.data import prepare_data
    from compress.models import load_model
    from compress.report import eval_tables, write_report
    from eval.runner import evaluate_pair

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out or Path(args.model) / "eval")
    data = prepare_data(data_cfg, tokenizer)
    if args.kernels:
        from eval.kernel_model import load_kernel_model

        student = load_kernel_model(args.model, dtype, device)
    else:
        student = load_model(args.model, dtype).to(device).eval()
    teacher = load_model(args.teacher, dtype).to(device).eval()
    results = evaluate_pair(student, teacher, tokenizer, cfg, data.val, student_dir=args.model, device=device,
                            data=data_cfg.model_dump(mode="json"), teacher_tokenizer=teacher_tokenizer)
    results.update(model=str(args.model), teacher_source=args.teacher,
                   student_kernel_modules=getattr(student.config, "kernel_modules", 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2, default=str))
    report = write_report(out, results=results)
    print(eval_tables(results))
    print(f"\nwrote {out / 'eval.json'} and {report}")
    if not results["passed"]:
        print(f"error: quality gates failed: {'; '.join(results['failures'])}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

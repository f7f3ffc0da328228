"""End-to-end decode: the teacher vs compressed exports served on our kernels, each export as the
teacher's speculative draft, and (``--synthetic``) Llama-3-8B-shaped layers where weight bytes set
the pace.

    python benchmarks/decode.py --exports int4=runs/a/final,s24int4=runs/b/final \
        [--teacher smollm2-135m-instruct] [--prompts 4] [--prompt-tokens 128] [--new-tokens 128] \
        [--ks 2,4] [--modes eager,graphs] [--synthetic 8]

Each model decodes greedily at batch 1, one prompt after another, prompts being held-out text (the
default data split's validation blocks), in two modes (``eval.decoders``): ``eager`` (a dynamic KV
cache, one eager forward a token: Python launches every kernel) and ``graphs`` (a static KV cache,
each decode step one CUDA graph replay: how servers decode, and where a kernel's own speed shows).
Each mode's tokens are checked against the eager teacher's (``same tokens``). Exports load with
``eval.kernel_model.load_kernel_model``: every quantized or 2:4 linear runs on our Triton kernels
on CUDA (their PyTorch references elsewhere, so CPU numbers say nothing about the kernels). bf16 on
CUDA, fp32 on CPU. Then each export drafts for the teacher (``serve_prompts``, greedy) in each
mode: acceptance, speedup over the teacher alone in the same mode, exact match. The issue's goal:
a distilled, quantized draft at >= 2x the teacher's tokens/s, output greedy-exact.

``--synthetic N``: N decoder layers of Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV
heads; vocab cut to 32,000 so the bf16 head does not dominate), random weights, bf16 vs every
linear in int4 (round-to-nearest, group 128) on our kernels, same prompts: tokens/s only (random
weights make the tokens meaningless). SmolLM2-135M's layers are 576 wide, too small for bytes to
matter at batch 1; these show what the kernels do to a model that is memory-bound.

On the lent GPU machine (scripts/device_payload.sh carries the teacher and deepspeed): make the
exports with two PTQ runs first, e.g. `launch/distill.py --recipe recipes/smollm2_distill.yaml
'student={init: teacher}' 'stages=[{kind: quantize, weights: {bits: 4, group_size: 64}}]'
output_dir=runs/int4`, and the same with `[{kind: sparsify}, {kind: quantize, ...}]` for 2:4 x int4
(seconds each on a GPU). Checked on CPU with a real int4 export (the reference path).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def decode_speed(model, prompts, new_tokens: int, device, graphs: bool) -> tuple[dict, list]:
    """tokens/s of greedy decoding over the prompts, and the tokens."""
    import torch

    from eval.speculative import greedy_generate

    prompts = [p % model.config.vocab_size for p in prompts]  # the synthetic model's vocab is smaller

    # warm-up (kernels' autotuning, graph capture, the GPU's clocks): on an H200 the teacher's first
    # eager row after a 4-token warm-up read 25 tokens/s, and 47 when measured again later
    greedy_generate(model, prompts[0], min(new_tokens, 32), graphs=graphs)
    tokens, seconds, outs = 0, 0.0, []
    for p in prompts:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = greedy_generate(model, p, new_tokens, graphs=graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += out.numel()
        outs.append(out)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens}, outs


def graph_error(model) -> str | None:
    """Why capturing this model's decode steps failed (they then ran eagerly), if it did."""
    from eval.decoders import graph_decoder

    dec = graph_decoder(model)
    return dec.graph_error if dec is not None else "no graph decoder was made"


def synthetic_llama(layers: int, device, dtype):
    """Llama-3-8B's layer shapes with random weights (vocab 32,000), in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


KINDS = {"int4": "int4 RTN", "s24int4": "2:4 magnitude x int4 RTN"}


def to_kernels(model, kind: str, group_size: int):
    """Every decoder-layer linear of ``model`` (in place) on our kernel modules, in the layouts our
    exports write: ``int4`` round-to-nearest (symmetric, per group), or ``s24int4`` magnitude 2:4 then
    int4 of the kept values (one-shot, untrained: a speed measurement, not a draft worth serving)."""
    from compress.quant import IntSpec, pack_int32, quantize
    from compress.sparsity import nm_mask, pack_24
    from kernels.modules import QuantLinearKernel, Sparse24LinearKernel

    spec = IntSpec(bits=4, group_size=group_size)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear" and n.startswith("model.layers.")]
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if kind == "int4":
            q, scale, _ = quantize(w, spec)
            module = QuantLinearKernel(pack_int32(q, 4), scale.to(w.dtype), None, 4, None)
        else:
            mask = nm_mask(w.abs().float(), 2, 4)
            q, scale, _ = quantize(w * mask.to(w.dtype), spec)
            codes, meta = pack_24(q, mask)
            module = Sparse24LinearKernel(pack_int32(codes, 4), meta, scale.to(w.dtype), w.shape[1], None)
        model.set_submodule(name, module)
    model.config.kernel_modules = len(names)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exports", default="", help="name=folder,... (our exports)")
    ap.add_argument("--in-memory", default="", help="the teacher made into these on our kernel modules (group 64), "
                    f"each also as a draft: {','.join(KINDS)}")
    ap.add_argument("--teacher", default="smollm2-135m-instruct",
                    help="'none': only the synthetic model, on seeded random prompts (no teacher, tokenizer or data)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--modes", default="eager,graphs")
    ap.add_argument("--synthetic", type=int, default=0, help="decoder layers of the Llama-3-8B-shaped model (0: none)")
    ap.add_argument("--synthetic-kinds", default="int4,s24int4", help="its compressed variants (group 128)")
    ap.add_argument("--tag", default=None, help="results name (default: decode_<device>)")
    args = ap.parse_args()
    import torch

    from eval.kernel_model import load_kernel_model
    from eval.speculative import serve_prompts

    exports = dict(item.split("=", 1) for item in args.exports.split(",") if item)
    for name, folder in exports.items():
        if not (Path(folder) / "config.json").is_file():
            sys.exit(f"error: export {name}={folder} has no config.json; give the final/ folder of a run")
    modes = args.modes.split(",")
    in_memory = [k for k in args.in_memory.split(",") if k]
    synthetic_kinds = [k for k in args.synthetic_kinds.split(",") if k] if args.synthetic else []
    if not set(in_memory + synthetic_kinds) <= set(KINDS):
        sys.exit(f"error: unknown kind in --in-memory / --synthetic-kinds: use some of {', '.join(KINDS)}")
    if not exports and not in_memory and not args.synthetic:
        sys.exit("error: nothing to compare with the teacher: give --exports, --in-memory or --synthetic N")
    no_teacher = args.teacher == "none"
    if no_teacher and (exports or in_memory or not args.synthetic):
        sys.exit("error: --teacher none runs the synthetic model alone: give --synthetic N and no exports or --in-memory")
    if not set(modes) <= {"eager", "graphs"}:
        sys.exit(f"error: --modes {args.modes}: use eager, graphs or eager,graphs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if no_teacher:
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 32000, (1, args.prompt_tokens), generator=gen).to(device) for _ in range(args.prompts)]
    else:
        from compress.data import prepare_data
        from compress.models import load_tokenizer
        from compress.recipe import DataConfig

        val = prepare_data(DataConfig(), load_tokenizer(args.teacher)).val
        prompts = [b[: args.prompt_tokens].long().reshape(1, -1).to(device) for b in val[: args.prompts]]

    rows, spec_rows = [], []
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (kernels' PyTorch references: not a speed claim)"

    def save():  # after every model: a run cut short keeps what it measured
        report(args, label, dtype, rows, spec_rows)

    def measure(name, model, base=None) -> dict:
        """One row per mode (``base``: {mode: the baseline's tokens/s}); returns {mode: tokens/s}."""
        outs, speeds = {}, {}
        for mode in modes:
            speed, outs[mode] = decode_speed(model, prompts, args.new_tokens, device, mode == "graphs")
            row = {"model": name, "mode": mode, "kernel modules": getattr(model.config, "kernel_modules", 0), **speed,
                   "speedup": speed["tokens_per_s"] / base[mode] if base else 1.0}
            if mode != "eager" and "eager" in outs:  # the graphs' tokens against the same model's eager ones
                row["same tokens as eager"] = all(torch.equal(a, b) for a, b in zip(outs[mode], outs["eager"]))
            if mode == "graphs":
                row["graph error"] = graph_error(model)
            rows.append(row)
            speeds[mode] = speed["tokens_per_s"]
            print(row, flush=True)
        save()
        return speeds

    if not no_teacher:
        from compress.models import load_model

        teacher = load_model(args.teacher, dtype).to(device).eval()
        teacher.config.use_cache = True
        base = measure("teacher", teacher)
    drafts = [(name, lambda folder=folder: load_kernel_model(folder, dtype, device)) for name, folder in exports.items()]
    for kind in in_memory:
        drafts.append((f"{KINDS[kind]} g64", lambda kind=kind: to_kernels(copy.deepcopy(teacher), kind, 64)))
    for name, make in drafts:
        model = make()
        model.config.use_cache = True
        measure(name, model, base)
        for mode in modes:
            baseline: dict = {}  # the teacher's greedy runs, shared by every k of this mode
            for k in (int(v) for v in args.ks.split(",")):
                s = serve_prompts(teacher, model, prompts, k=k, max_new_tokens=args.new_tokens, baseline=baseline,
                                  graphs=mode == "graphs", hopeless_below=0.05)
                spec_rows.append({"draft": name, "mode": mode, **{c: s[c] for c in (
                    "k", "acceptance_rate", "mean_accepted_per_pass", "target_tokens_per_s", "spec_tokens_per_s",
                    "speedup", "exact_match", "n_prompts", "stopped")}})
                print(spec_rows[-1], flush=True)
                save()
        del model
    if args.synthetic:
        name = f"llama3-8b-shaped x{args.synthetic} layers"
        synth_base = measure(f"{name}, {str(dtype).removeprefix('torch.')}", synthetic_llama(args.synthetic, device, dtype))
        for kind in synthetic_kinds:
            measure(f"{name}, {KINDS[kind]} g128", to_kernels(synthetic_llama(args.synthetic, device, dtype), kind, 128),
                    synth_base)
    return 0


def report(args, label: str, dtype, rows: list, spec_rows: list) -> None:
    """benchmarks/results/<tag>.{json,md} from the rows measured so far."""
    from benchmarks.common import write_results
    from compress.tracking import format_table

    command = (f"python benchmarks/decode.py --exports '{args.exports}' --in-memory '{args.in_memory}' --teacher {args.teacher} --prompts {args.prompts} "
               f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens} --ks {args.ks} "
               f"--modes {args.modes} --synthetic {args.synthetic} --synthetic-kinds {args.synthetic_kinds}")
    md = "\n".join([
        f"Greedy decode at batch 1, {args.prompts} {'random' if args.teacher == 'none' else 'held-out'} prompts of "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new "
        f"tokens each, {str(dtype).removeprefix('torch.')}, on {label}. `eager`: dynamic KV cache, one eager forward a "
        "token; `graphs`: static KV cache, each decode step one CUDA graph replay (eval.decoders). Speed-ups are "
        "against the baseline above the row (the teacher, or the bf16 synthetic model) in the same mode; `same "
        "tokens as eager`: the mode's greedy tokens equal the same model's eager ones.", f"Command: {command}", "",
        format_table(rows, ["model", "mode", "kernel modules", "tokens_per_s", "speedup", "same tokens as eager",
                            "graph error"]), "",
        "Each export as the teacher's draft (speculative decoding, greedy):", "",
        format_table(spec_rows, list(spec_rows[0])) if spec_rows else "(no exports given)", ""])
    tag = args.tag or f"decode_{'cpu' if label.startswith('cpu') else 'cuda'}"
    write_results(tag, {"args": vars(args), "device": label, "rows": rows, "speculative": spec_rows}, md)


if __name__ == "__main__":
    sys.exit(main())

"""DeepSpeed training step vs a plain PyTorch loop: same student, teacher, KD loss and data.

    .venv/bin/python benchmarks/step_time.py [--steps 8] [--micro-batch 4]

Each mode runs in its own process (so peak memory is its own): `--mode torch` is the
minimal loop (forward, KD loss, backward, clip, AdamW, LR schedule); `--mode deepspeed` is
compress.train's engine path (ZeRO-0). Reports mean step time after warm-up, the ratio
(goal <= 1.10x), and peak memory (max RSS on CPU, max allocated on GPU). Writes
benchmarks/results/step_time.json and .md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(mode: str, steps: int, micro_batch: int, warmup: int = 2) -> dict:
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29577").items():
        os.environ.setdefault(k, v)
    import torch

    from compress.methods.distill import Distill
    from compress.models import build_student, load_model, load_tokenizer
    from compress.recipe import load_recipe
    from compress.stages import RunContext
    from compress.teacher import Teacher
    from compress.train import ds_config, lr_lambda, make_optimizer
    from compress.data import prepare_data, sample_indices

    recipe = load_recipe(REPO / "recipes/smollm2_distill.yaml", [f"train.micro_batch_size={micro_batch}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tr = recipe.train
    data = prepare_data(recipe.data, load_tokenizer(recipe.teacher.source))
    teacher_model = load_model(recipe.teacher.source)
    student, _ = build_student(recipe, teacher_model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = RunContext(recipe=recipe, output_dir=Path("/tmp"), tokenizer=None, data=data, logger=None, device=device,
                     teacher=Teacher(teacher_model, device=device, dtype=dtype))
    method = Distill(recipe.stages[0], ctx)
    module = method.wrap(student.to(device))
    optimizer = make_optimizer(module, tr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tr, steps + warmup))

    if mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(verbose=False)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_config(tr, device))

        def step(batch):
            loss, _ = method.loss(engine, batch)
            engine.backward(loss)
            engine.step()
    else:
        if device.type == "cuda":
            module.to(torch.bfloat16)  # same compute dtype as DeepSpeed's bf16 mode (no fp32 master copy)

        def step(batch):
            loss, _ = method.loss(module, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), tr.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for s in range(warmup + steps):
        batch = data.batch(sample_indices(0, s, len(data.train), micro_batch))
        batch = {k: v.to(device) if k != "index" else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": str(device), "step_time_s": sum(times) / len(times),
            "peak_memory_bytes": peak, "steps": steps, "micro_batch": micro_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["torch", "deepspeed"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args.mode, args.steps, args.micro_batch)), flush=True)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = {}
    for mode in ("torch", "deepspeed"):
        p = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                            "--micro-batch", str(args.micro_batch)], capture_output=True, text=True, env=env, check=True)
        res[mode] = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    ratio = res["deepspeed"]["step_time_s"] / res["torch"]["step_time_s"]
    mem = res["deepspeed"]["peak_memory_bytes"] / res["torch"]["peak_memory_bytes"]
    lines = [f"Step time, KD on SmolLM2-135M → 16-layer student, micro-batch {args.micro_batch} x 128, "
             f"{args.steps} timed steps, device {res['torch']['device']}.",
             f"Command: .venv/bin/python benchmarks/step_time.py --steps {args.steps} --micro-batch {args.micro_batch}", "",
             "| loop | step time (s) | peak memory (GiB) |", "|---|---|---|"]
    for mode, r in res.items():
        lines.append(f"| {mode} | {r['step_time_s']:.3f} | {r['peak_memory_bytes'] / 2**30:.2f} |")
    lines += ["", f"DeepSpeed / torch step time: {ratio:.3f}x (goal <= 1.10x); peak memory {mem:.3f}x"]
    print("\n".join(lines))
    out = REPO / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps({"results": res, "ratio": ratio, "memory_ratio": mem}, indent=2))
    (out / "step_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Kernel speed on a GPU: our W4A16 / W8A16 / 2:4 / 2:4 x int4 kernels vs torch bf16 matmul (cuBLAS),
torch's own int4 path (``torch._weight_int4pack_mm``, where it runs) and torch's 2:4
(``to_sparse_semi_structured``), at decode and prefill batch sizes.

    .venv/bin/python benchmarks/kernels.py [--batches 1,16,128] [--shapes NxK,...] [--tag kernels]

For each weight shape N x K (Llama-like 4096x4096, 14336x4096, 4096x14336 and SmolLM2's own) and
batch M: median time over CUDA-event-timed repetitions, achieved GB/s (bytes of weight + metadata
+ scales + activations read, output written) against the device's HBM roofline, TFLOP/s, and each
kernel's speedup over bf16 matmul measured in the same run. Needs CUDA (exits 2 otherwise: the
CPU interpreter proves correctness, not speed). Goals on an H100 (issue 17): int4 GEMV >= 85% of
the 3.35 TB/s roofline and >= 3.5x bf16 at batch 1; 2:4 >= 1.6x; 2:4 x int4 >= 4.5x.
"""

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import write_results  # noqa: E402

SHAPES = "4096x4096,14336x4096,4096x14336,1536x576,576x1536"
ROOFLINE_TBS = {"H100": 3.35, "H200": 4.8}


def timed(fn, reps: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def inputs(n: int, k: int, m: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    packed4 = torch.randint(-(1 << 31), 1 << 31, (n, k // 8), device="cuda", dtype=torch.int64, generator=g).to(torch.int32)
    packed8 = torch.randint(-(1 << 31), 1 << 31, (n, k // 4), device="cuda", dtype=torch.int64, generator=g).to(torch.int32)
    scale = torch.rand(n, k // 128 if k % 128 == 0 else k // 64, device="cuda", generator=g).to(torch.bfloat16) * 0.01
    pairs = torch.tensor([4, 8, 12, 9, 13, 14], dtype=torch.uint8, device="cuda")
    nib = pairs[torch.randint(0, 6, (n, k // 4), device="cuda", generator=g)]
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    values = torch.randn(n, k // 2, device="cuda", dtype=torch.bfloat16, generator=g)
    codes = torch.randint(-(1 << 31), 1 << 31, (n, k // 16), device="cuda", dtype=torch.int64, generator=g).to(torch.int32)
    return x, w, packed4, packed8, scale, meta, values, codes


def bench_shape(n: int, k: int, m: int, roofline: float) -> list[dict]:
    import torch

    from kernels.sparse24 import triton_sparse24
    from kernels.wna16 import triton_wna16

    x, w, p4, p8, scale, meta, values, codes = inputs(n, k, m)
    act = m * k * 2 + m * n * 2
    runs = {"bf16 matmul (cuBLAS)": (lambda: x @ w.t(), n * k * 2),
            "ours W4A16": (lambda: triton_wna16(x, p4, scale, None, 4), n * k // 2 + scale.numel() * 2),
            "ours W8A16": (lambda: triton_wna16(x, p8, scale, None, 8), n * k + scale.numel() * 2),
            "ours 2:4": (lambda: triton_sparse24(x, values, meta), n * k + n * k // 8),
            "ours 2:4 x int4": (lambda: triton_sparse24(x, codes, meta, scale), n * k // 4 + n * k // 8 + scale.numel() * 2)}
    try:
        w_int4 = torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8), 8)
        sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
        runs["torch _weight_int4pack_mm"] = (lambda: torch._weight_int4pack_mm(x, w_int4, 128, sz), n * k // 2)
    except Exception as e:  # noqa: BLE001 - report why it did not run
        print(f"torch int4 path unavailable at {n}x{k}: {type(e).__name__}: {str(e)[:80]}")
    if m >= 32:  # torch's semi-structured sparse matmul needs a minimum batch
        try:
            from torch.sparse import to_sparse_semi_structured

            mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, k // 4)
            ws = to_sparse_semi_structured(w * mask)
            runs["torch to_sparse_semi_structured"] = (lambda: torch.mm(ws, x.t()), n * k + n * k // 8)
        except Exception as e:  # noqa: BLE001
            print(f"torch 2:4 path unavailable at {n}x{k}: {type(e).__name__}: {str(e)[:80]}")
    base = timed(runs["bf16 matmul (cuBLAS)"][0])
    rows = []
    for name, (fn, weight_bytes) in runs.items():
        t = timed(fn)
        gbs = (weight_bytes + act) / t / 1e9
        rows.append({"kernel": name, "M": m, "N": n, "K": k, "us": round(t * 1e6, 2), "GB/s": round(gbs, 1),
                     "% roofline": round(100 * gbs / (roofline * 1e3), 1), "TFLOP/s": round(2 * m * n * k / t / 1e12, 2),
                     "speedup vs bf16": round(base / t, 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--tag", default="kernels")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: kernel speed is measured on a CUDA GPU; on CPU run `TRITON_INTERPRET=1 python -m "
              "kernels.selftest --device cpu` for correctness", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    roofline = next((v for key, v in ROOFLINE_TBS.items() if key in device), 3.35)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(b) for b in args.batches.split(",")):
            rows += bench_shape(n, k, m, roofline)
    from compress.tracking import format_table

    md = (f"Kernel speed on {device} (HBM roofline taken as {roofline} TB/s), bf16 activations, median of 50 "
          f"CUDA-event-timed calls. Command: .venv/bin/python benchmarks/kernels.py --batches {args.batches} "
          f"--shapes {args.shapes}\n\n" + format_table(rows, list(rows[0])) + "\n")
    write_results(args.tag, {"device": device, "roofline_tbs": roofline, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

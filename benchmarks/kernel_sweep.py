"""Time fixed tile configs of one of our kernels on one weight shape (CUDA): which way the tiles
should move before they go into the autotuner's candidates, and, under a profiler, why.

    python benchmarks/kernel_sweep.py w4 --shape 14336x4096 --tiles 64x128,256x128 --warps 2,4 \
        --splits 4,16 --stages 2,3 [--maxnreg 0,80] [--m 1] [--tag sweep_w4]
    ncu --section WarpStateStats -k regex:_wna16 python benchmarks/kernel_sweep.py w4 ... --once

Kernels: w4, w8 (W4A16 / W8A16, group 128), s24 (2:4, bf16 values), s24i4 (2:4 x int4, group 128).
Every combination of tiles (BLOCK_N x BLOCK_K), warps, split, stages and register cap runs at BLOCK_M 1 (M = 1)
or 16, is checked against the PyTorch reference, and is timed as ``benchmarks/kernels.py`` times
the autotuned one (CUDA-graph replays over weight copies that do not fit in L2), beside bf16
matmul on the same shape. ``--once``: each config runs once, untimed (one launch each for a profiler).
"""

import argparse
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import write_results  # noqa: E402
from benchmarks.kernels import ROOFLINE_TBS, copies_for, kernels_at, timed, weights  # noqa: E402

NAMES = {"w4": "ours W4A16", "w8": "ours W8A16", "s24": "ours 2:4", "s24i4": "ours 2:4 x int4"}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=list(NAMES))
    ap.add_argument("--shape", default="14336x4096", help="N x K")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--tiles", default="64x128,128x128,256x128", help="BLOCK_N x BLOCK_K, comma-separated")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--splits", default="4,16")
    ap.add_argument("--stages", default="3")
    ap.add_argument("--maxnreg", default="0", help="register caps a thread to try (0: none)")
    ap.add_argument("--once", action="store_true", help="one untimed launch a config (for a profiler)")
    ap.add_argument("--tag", default=None, help="write benchmarks/results/<tag>.{json,md}")
    args = ap.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        print("error: the sweep times kernels on a CUDA GPU", file=sys.stderr)
        return 2
    n, k = (int(v) for v in args.shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    call, ref, nbytes = kernels_at(n, k)[NAMES[args.kernel]]
    pool = [weights(n, k, g) for _ in range(copies_for(n * k // 4))]
    want = ref(x, pool[0]).float()
    device = torch.cuda.get_device_name()
    roofline = next((v for key, v in ROOFLINE_TBS.items() if key in device), 3.35)
    moved = nbytes(pool[0]) + args.m * k * 2 + args.m * n * 2
    rows = []
    if not args.once:
        t, _ = timed([lambda w=w: x @ w["w"].t() for w in pool[: copies_for(n * k * 2)]])
        rows.append({"config": "bf16 matmul (cuBLAS)", "us": round(t * 1e6, 2),
                     "% roofline": round(100 * (n * k * 2 + args.m * k * 2) / t / 1e12 / roofline, 1), "rel err": ""})
    bm = 1 if args.m == 1 else 16
    for tile, warps, split, stages, regs in itertools.product(args.tiles.split(","), ints(args.warps),
                                                               ints(args.splits), ints(args.stages), ints(args.maxnreg)):
        bn, bk = (int(v) for v in tile.split("x"))
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "LOOP_STAGES": stages,
               "num_warps": warps, "num_stages": stages}
        if regs:
            cfg["maxnreg"] = regs
        name = f"{bm}x{bn}x{bk} w{warps} split{split} s{stages}" + (f" r{regs}" if regs else "")
        try:
            got = call(x, pool[0], cfg)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is reported, not fatal
            why = f"{type(e).__name__}: {str(e)[:60]}"
            rows.append({"config": name, "us": None, "% roofline": None, "rel err": why})
            continue
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        if args.once:
            print(name, f"rel err {err:.1e}", flush=True)
            continue
        t, _ = timed([lambda w=w: call(x, w, cfg) for w in pool[: copies_for(nbytes(pool[0]))]])
        rows.append({"config": name, "us": round(t * 1e6, 2), "% roofline": round(100 * moved / t / 1e12 / roofline, 1),
                     "rel err": f"{err:.1e}"})
        print(rows[-1], flush=True)
    if args.once:
        return 0
    from compress.tracking import format_table

    rows.sort(key=lambda r: float("inf") if r["us"] is None else r["us"])
    md = (f"{NAMES[args.kernel]} at M={args.m}, N x K = {n} x {k} on {device} (HBM roofline {roofline} TB/s), bf16 "
          f"activations, torch {torch.__version__}, triton {triton.__version__}; fixed tiles, timed as in "
          f"benchmarks/kernels.py.\nCommand: python benchmarks/kernel_sweep.py {' '.join(sys.argv[1:])}\n\n"
          + format_table(rows, list(rows[0])) + "\n")
    if args.tag:
        payload = {"device": device, "kernel": args.kernel, "n": n, "k": k, "m": args.m, "rows": rows}
        write_results(args.tag, payload, md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every kernel against its PyTorch reference on a set of shapes: run it on a new machine.

    python -m kernels.selftest [--shapes MxNxK,...] [--dtype fp16|bf16|fp32] [--device cuda|cpu]
    TRITON_INTERPRET=1 python -m kernels.selftest --device cpu     # no GPU: Triton's interpreter

Each case runs under the fixed tiles of its path (a GEMV for M = 1, tl.dot above), the same with
K split over 3 programs, and with ``--tuned`` (CUDA) the autotuned tiles.
Prints the max abs and relative error per kernel, shape and tiles (a group size that does not divide K,
or a K a kernel cannot take, is listed as skipped, not failed) and exits 1 on any mismatch beyond
the dtype's tolerance (2 when the kernels cannot run here at all).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from kernels.sparse24 import torch_sparse24, triton_sparse24
from kernels.tiles import fixed_config
from kernels.wna16 import torch_wna16, triton_wna16

DEFAULT_SHAPES = "1x64x128,5x72x192,16x64x576,33x40x256,128x64x128"  # odd M, N off the block, SmolLM2's K
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |err| / max |ref|
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_packed(n: int, k: int, bits: int, g: torch.Generator) -> torch.Tensor:
    """Random int32 words: any bit pattern is a valid packing of 32 / bits values."""
    return torch.randint(-(1 << 31), 1 << 31, (n, k * bits // 32), generator=g, dtype=torch.int64).to(torch.int32)


def random_meta(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    pairs = torch.tensor([0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2], dtype=torch.uint8)
    nib = pairs[torch.randint(0, 6, (n, k // 4), generator=g)]
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def cases(m: int, n: int, k: int, dtype: torch.dtype, device: str, g: torch.Generator):
    """(name, kernel call, reference call) or (name, None, why skipped)."""
    x = torch.randn(m, k, generator=g).to(device, dtype)
    for bits, group in [(4, 32), (4, 64), (4, 128), (4, None), (8, None), (8, 128)]:
        name = f"w{bits}a16 g{group or 'channel'}"
        gs = group or k
        if k % gs or k % (32 // bits):
            yield name, None, f"group {gs} does not divide K={k}"
            continue
        packed = random_packed(n, k, bits, g).to(device)
        scale = (torch.rand(n, k // gs, generator=g) * 0.02).to(device, dtype)
        yield name, (lambda cfg, p=packed, s=scale, b=bits: triton_wna16(x, p, s, None, b, config=cfg)), \
            (lambda p=packed, s=scale, b=bits: torch_wna16(x, p, s, None, b))
    if k % 64:
        yield "w4a16 g64 asym", None, f"group 64 does not divide K={k}"
    else:
        packed = random_packed(n, k, 4, g).to(device)
        scale = (torch.rand(n, k // 64, generator=g) * 0.02).to(device, dtype)
        zero = torch.randint(-4, 4, (n, k // 64), generator=g, dtype=torch.int8).to(device)
        yield "w4a16 g64 asym", lambda cfg: triton_wna16(x, packed, scale, zero, 4, config=cfg), lambda: torch_wna16(x, packed, scale, zero, 4)
    if k % 16:
        yield "2:4", None, f"K={k} is not a multiple of 16"
        yield "2:4 x int4", None, f"K={k} is not a multiple of 16"
        return
    meta = random_meta(n, k, g).to(device)
    values = torch.randn(n, k // 2, generator=g).to(device, dtype)
    yield "2:4", lambda cfg: triton_sparse24(x, values, meta, config=cfg), lambda: torch_sparse24(x, values, meta)
    if k % 64:
        yield "2:4 x int4 g64", None, f"group 64 does not divide K={k}"
        return
    codes = random_packed(n, k // 2, 4, g).to(device)
    scale = (torch.rand(n, k // 64, generator=g) * 0.02).to(device, dtype)
    yield "2:4 x int4 g64", lambda cfg: triton_sparse24(x, codes, meta, scale, config=cfg), lambda: torch_sparse24(x, codes, meta, scale)


def tile_variants(m: int, tuned: bool, kernel: str) -> list[tuple[str, dict | None]]:
    """The tile configs each case runs under: the fixed one of its path (GEMV for M = 1, tl.dot
    above), the same with K split over 3 programs, the 2:4 GEMV's other mode, and on CUDA with
    ``tuned`` the autotuned one."""
    out = [("fixed", fixed_config(m)), ("split-K 3", fixed_config(m, 3))]
    if m == 1 and kernel.startswith("2:4"):
        out.append(("gemv mode 1", fixed_config(m) | {"GEMV_MODE": 1}))
    return out + [("tuned", None)] if tuned else out


def run(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: str, out=print,
        tolerance: float | None = None, tuned: bool = False) -> int:
    g = torch.Generator().manual_seed(0)
    failed = 0
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    out(f"{'kernel':<18} {'M x N x K':<16} {'tiles':<12} {'max abs err':>12} {'rel err':>10}  result")
    for m, n, k in shapes:
        for name, kernel, ref in cases(m, n, k, dtype, device, g):
            shape = f"{m}x{n}x{k}"
            if kernel is None:
                out(f"{name:<18} {shape:<16} {'':<12} {'':>12} {'':>10}  skipped: {ref}")
                continue
            want = ref().float()
            for tiles, cfg in tile_variants(m, tuned, name):
                got = kernel(cfg).float()
                err = (got - want).abs().max().item()
                rel = err / max(want.abs().max().item(), 1e-30)
                ok = rel <= tol
                failed += not ok
                out(f"{name:<18} {shape:<16} {tiles:<12} {err:>12.3e} {rel:>10.2e}  {'ok' if ok else 'MISMATCH'}")
    out(f"{'all ok' if not failed else f'{failed} mismatch(es)'} (tolerance: relative {tol:.0e} for {dtype})")
    return 1 if failed else 0


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        sys.exit(f"error: --shapes takes MxNxK,... (e.g. 1x4096x4096); got {text!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tuned", action="store_true", help="also check the autotuned tiles (CUDA; compiles every candidate)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: the kernels run on a GPU, or on CPU in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.device == "cpu" and dtype == torch.bfloat16:
        print("note: bf16 in Triton's interpreter is unreliable; use --dtype fp16 or fp32 on CPU", file=sys.stderr)
    return run(parse_shapes(args.shapes), dtype, args.device, tuned=args.tuned and args.device != "cpu")


if __name__ == "__main__":
    sys.exit(main())

"""Compile one of our Triton kernels for a GPU target here, with no GPU, and count what its PTX
does: global loads by width, cp.async (pipelined loads), tensor-core ops, int-to-float converts.
How a kernel change can be checked for codegen between the rare sessions that have a GPU.

    .venv/bin/python scripts/kernel_ptx.py wna16 --tiles 1x16x512 --mode 0 [--bits 4 --group 128]
    .venv/bin/python scripts/kernel_ptx.py sparse24 --tiles 16x32x128 --int4 [--arch 90] [--dump out.ptx]

Seen on wna16 at sm_90 (Triton 3.9): with a plain ``range`` K loop the GEMV (BLOCK_M 1) had no
cp.async (its weight loads were not pipelined; only the tl.dot path's were). With
``tl.range(..., num_stages=LOOP_STAGES)`` the 1x16x512 mode-0 GEMV has 12 cp.async and the 1x32x256
mode-1 one 15 (``--loop-stages 1`` shows 0 again).
"""

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=["wna16", "sparse24"])
    ap.add_argument("--tiles", default="1x16x512", help="BLOCK_M x BLOCK_N x BLOCK_K")
    ap.add_argument("--mode", type=int, default=0, help="GEMV_MODE (BLOCK_M 1)")
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--int4", action="store_true", help="sparse24: int4 codes instead of float values")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--loop-stages", type=int, default=None, help="LOOP_STAGES (default: --stages)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dump", help="write the PTX here")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import sparse24, wna16

    bm, bn, bk = (int(v) for v in args.tiles.split("x"))
    tensors = ["x_ptr", "w_ptr", "s_ptr", "z_ptr"] if args.kernel == "wna16" else ["x_ptr", "v_ptr", "meta_ptr", "s_ptr"]
    kinds = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i8", "meta_ptr": "*i16",
             "v_ptr": "*i32" if args.int4 else "*bf16"}
    strides = ["stride_xm", "stride_wn", "stride_sn"] if args.kernel == "wna16" else \
        ["stride_xm", "stride_vn", "stride_mn", "stride_sn"]
    sig = {t: kinds[t] for t in tensors} | {"y_ptr": "*bf16" if args.split == 1 else "*fp32"}
    sig |= {n: "i32" for n in ["M", "N", "K", "G_COUNT", "M_BUCKET", *strides, "stride_ym", "stride_ys"]}
    consts = {"GROUP": args.group, "SPLIT": args.split, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
              "BLOCK_K": bk, "GEMV_MODE": args.mode,
              "LOOP_STAGES": args.stages if args.loop_stages is None else args.loop_stages}
    consts |= {"BITS": args.bits, "HAS_ZERO": False} if args.kernel == "wna16" else {"INT4": args.int4}
    fn = wna16._wna16_kernel if args.kernel == "wna16" else sparse24._sparse24_kernel
    names = list(fn.arg_names)
    sig = {n: sig.get(n, "constexpr") for n in names}
    aligned = {"x_ptr", "w_ptr", "v_ptr", "meta_ptr", "s_ptr", "z_ptr", "y_ptr", "N", "K", *strides, "stride_ym"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}  # as the launcher sees them
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                         options={"num_warps": args.warps, "num_stages": args.stages}).asm["ptx"]
    if args.dump:
        Path(args.dump).write_text(ptx)
    print(f"{args.kernel} {args.tiles} mode {args.mode} split {args.split} sm_{args.arch}: {ptx.count(chr(10))} PTX lines")
    print("global loads:", dict(Counter(re.findall(r"ld\.global[.\w]*", ptx))))
    print("cp.async (pipelined loads):", len(re.findall(r"cp\.async\.c[ag]", ptx)))
    print("tensor-core ops:", len(re.findall(r"wgmma\.mma_async|mma\.sync", ptx)))
    print("int-to-float converts:", len(re.findall(r"cvt\.rn\.f32\.s32", ptx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

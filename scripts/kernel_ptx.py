"""Compile one of our Triton kernels for a GPU target here, with no GPU, and count what its PTX
does: global loads by width, cp.async (pipelined loads), tensor-core ops, int-to-float converts;
then assemble it with the ptxas Triton ships and count the SASS instructions of its K loop (the
longest backward branch), per weight value a thread handles in one trip, with the registers and
spills. How a kernel change can be checked for codegen between the rare sessions that have a GPU:
decode GEMV is bound by instructions per value as much as by bytes (an H200 issues ~3.3e13 thread
instructions/s against 9.6e12 int4 values/s of HBM bandwidth).

    .venv/bin/python scripts/kernel_ptx.py wna16 --tiles 1x128x128 [--bits 4 --group 128]
    .venv/bin/python scripts/kernel_ptx.py sparse24 --tiles 16x32x128 --int4 [--arch 90] [--dump out.ptx]

Seen on wna16 at sm_90 (Triton 3.9): with a plain ``range`` K loop the GEMV (BLOCK_M 1) had no
cp.async (its weight loads were not pipelined; only the tl.dot path's were). With
``tl.range(..., num_stages=LOOP_STAGES)`` the 1x16x512 mode-0 GEMV has 12 cp.async and the 1x32x256
mode-1 one 15 (``--loop-stages 1`` shows 0 again). SASS a value, int4 GEMV (``wna16 --tiles
1x256x128``): 12.8 for the one-row-a-thread GEMV measured on the H200, 3.35 for the AND-and-FMA one.
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
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--int4", action="store_true", help="sparse24: int4 codes instead of float values")
    ap.add_argument("--gemv-mode", type=int, default=0, help="sparse24: GEMV_MODE (0 pairs, 1 tiles)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--loop-stages", type=int, default=None, help="LOOP_STAGES (default: --stages)")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers a thread (ptxas -maxrregcount)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dump", help="write the PTX here (and the TTGIR beside it)")
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
    sig = {t: kinds[t] for t in tensors} | {"y_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
    sig |= {n: "i32" for n in ["M", "N", "K", "G_COUNT", "M_BUCKET", *strides, "stride_ym", "stride_ps"]}
    consts = {"GROUP": args.group, "SPLIT": args.split, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
              "BLOCK_K": bk,
              "LOOP_STAGES": args.stages if args.loop_stages is None else args.loop_stages}
    consts |= {"BITS": args.bits, "HAS_ZERO": False} if args.kernel == "wna16" else {"INT4": args.int4}
    if args.kernel == "sparse24":
        consts["GEMV_MODE"] = args.gemv_mode
    fn = wna16._wna16_kernel if args.kernel == "wna16" else sparse24._sparse24_kernel
    names = list(fn.arg_names)
    sig = {n: sig.get(n, "constexpr") for n in names}
    aligned = {"x_ptr", "w_ptr", "v_ptr", "meta_ptr", "s_ptr", "z_ptr", "y_ptr", "part_ptr", "count_ptr", "N", "K",
               *strides, "stride_ym", "stride_ps"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}  # as the launcher sees them
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                                    attrs=attrs)
    asm = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                         options={"num_warps": args.warps, "num_stages": args.stages}
                         | ({"maxnreg": args.maxnreg} if args.maxnreg else {})).asm
    ptx = asm["ptx"]
    if args.dump:
        Path(args.dump).write_text(ptx)
        Path(args.dump).with_suffix(".ttgir").write_text(asm["ttgir"])
    print(f"{args.kernel} {args.tiles} split {args.split} sm_{args.arch}: {ptx.count(chr(10))} PTX lines")
    print("global loads:", dict(Counter(re.findall(r"ld\.global[.\w]*", ptx))))
    print("cp.async (pipelined loads):", len(re.findall(r"cp\.async\.c[ag]", ptx)))
    print("tensor-core ops:", len(re.findall(r"wgmma\.mma_async|mma\.sync", ptx)))
    print("int-to-float converts:", len(re.findall(r"cvt\.rn\.f32\.s32", ptx)))
    if bm == 1:  # GEMV: values (kept values for 2:4) a thread handles in one trip of the K loop
        per_thread = bn * (bk // 2 if args.kernel == "sparse24" else bk) // (32 * args.warps)
        sass_loop(ptx, args.arch, per_thread)
    return 0


def sass_loop(ptx: str, arch: int, values: int) -> None:
    """Assemble the PTX with Triton's ptxas and print the K loop's SASS instruction count and mix."""
    import subprocess
    import tempfile

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists()), None)
    if ptxas is None or not (tools / "nvdisasm").exists():
        print("SASS: no ptxas / nvdisasm in this Triton install")
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        built = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(src), "-o", str(cubin)],
                               capture_output=True, text=True)
        if built.returncode:
            print("SASS: ptxas failed:", built.stderr.strip().splitlines()[-1])
            return
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", built.stderr)
    spills = re.search(r"(\d+) bytes spill stores", built.stderr)
    labels, ops = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
        elif op := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            ops.append(op.group(1).strip())
    loops = [(labels[m.group(1)], i) for i, op in enumerate(ops)
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", op)) and labels.get(m.group(1), i + 1) <= i]
    if not loops:
        print("SASS: no loop found")
        return
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    body = [op.split()[1] if op.startswith("@") else op.split()[0] for op in ops[lo:hi + 1]]
    mix = Counter(name.split(".")[0] for name in body).most_common(8)
    print(f"SASS (sm_{arch}a): {regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes "
          f"spilled; K loop {len(body)} instructions for {values} values a thread = {len(body) / values:.2f} a value")
    print("  mix:", ", ".join(f"{name} {count}" for name, count in mix))


if __name__ == "__main__":
    sys.exit(main())

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import write_results  # noqa: E402

SHAPES = "4096x4096,14336x4096,4096x14336,1536x576,576x1536"
ROOFLINE_TBS = {"H100": 3.35, "H200": 4.8}


def copies_for(weight_bytes: int) -> int:
    """Enough copies of a weight to rotate through that no call finds it in L2 (>= 4x the 50-60 MB)."""
    return max(1, min(64, -(-256 * 2**20 // weight_bytes)))


def timed(calls: list, reps: int = 20) -> tuple[float, float]:
    """(seconds a call in a CUDA graph, seconds a call eager) over a rotation of calls on different weight
    copies. The graph time is the GPU's; the eager time adds Python and launch overheads."""
    import torch

    for c in calls:
        c()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(max(1, reps // 4)):
        for c in calls:
            c()
    b.record()
    torch.cuda.synchronize()
    eager = a.elapsed_time(b) / 1e3 / (max(1, reps // 4) * len(calls))
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for c in calls:
                c()
    except Exception as e:  # noqa: BLE001 - a path that cannot be captured is timed eager only
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:80]})")
        return eager, eager
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(calls))
    return statistics.median(times), eager


def weights(n: int, k: int, g):
    """One copy of every weight format at N x K (random bits: the kernels' speed does not depend on values)."""
    import torch

    def words(cols):
        return torch.randint(-(1 << 31), 1 << 31, (n, cols), device="cuda", dtype=torch.int64, generator=g).to(torch.int32)

    group = 128 if k % 128 == 0 else 64
    scale = (torch.rand(n, k // group, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
    pairs = torch.tensor([4, 8, 12, 9, 13, 14], dtype=torch.uint8, device="cuda")
    nib = pairs[torch.randint(0, 6, (n, k // 4), device="cuda", generator=g)]
    return {"w": torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
            "p4": words(k // 8), "p8": words(k // 4), "scale": scale,
            "meta": nib[:, 0::2] | (nib[:, 1::2] << 4),
            "values": torch.randn(n, k // 2, device="cuda", dtype=torch.bfloat16, generator=g), "codes": words(k // 16)}


def kernels_at(n: int, k: int):
    """name -> (call(x, w[, config]) -> y, reference(x, w) -> y or None, weight bytes read); ``config``
    fixes our kernels' tiles instead of autotuning them (``benchmarks/kernel_sweep.py``)."""
    from kernels.sparse24 import torch_sparse24, triton_sparse24
    from kernels.wna16 import torch_wna16, triton_wna16

    def scale_bytes(w):
        return w["scale"].numel() * 2

    return {
        "bf16 matmul (cuBLAS)": (lambda x, w: x @ w["w"].t(), None, lambda w: n * k * 2),
        "ours W4A16": (lambda x, w, cfg=None: triton_wna16(x, w["p4"], w["scale"], None, 4, config=cfg),
                       lambda x, w: torch_wna16(x, w["p4"], w["scale"], None, 4), lambda w: n * k // 2 + scale_bytes(w)),
        "ours W8A16": (lambda x, w, cfg=None: triton_wna16(x, w["p8"], w["scale"], None, 8, config=cfg),
                       lambda x, w: torch_wna16(x, w["p8"], w["scale"], None, 8), lambda w: n * k + scale_bytes(w)),
        "ours 2:4": (lambda x, w, cfg=None: triton_sparse24(x, w["values"], w["meta"], config=cfg),
                     lambda x, w: torch_sparse24(x, w["values"], w["meta"]), lambda w: n * k + n * k // 8),
        "ours 2:4 x int4": (lambda x, w, cfg=None: triton_sparse24(x, w["codes"], w["meta"], w["scale"],
                                                                   config=cfg),
                            lambda x, w: torch_sparse24(x, w["codes"], w["meta"], w["scale"]),
                            lambda w: n * k // 4 + n * k // 8 + scale_bytes(w)),
    }


def torch_peers(n: int, k: int, m: int, copies: int, g) -> dict:
    """torch's own int4 (tinygemm) and 2:4 (cuSPARSELt / CUTLASS) paths, where they run here."""
    import torch

    out = {}
    try:
        packs = []
        for _ in range(copies):
            w_int4 = torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=g), 8)
            packs.append((w_int4, torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16, generator=g)))
        out["torch _weight_int4pack_mm"] = (lambda x, p: torch._weight_int4pack_mm(x, p[0], 128, p[1]), packs,
                                            n * k // 2 + n * k // 64)
    except Exception as e:  # noqa: BLE001 - report why it did not run
        print(f"  torch int4 path unavailable at {n}x{k}: {type(e).__name__}: {str(e)[:80]}")
    try:
        from torch.sparse import to_sparse_semi_structured

        mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, k // 4)
        mats = [to_sparse_semi_structured(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * mask)
                for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        torch.mm(mats[0], x.t())
        out["torch to_sparse_semi_structured"] = (lambda x, ws: torch.mm(ws, x.t()), mats, n * k + n * k // 8)
    except Exception as e:  # noqa: BLE001
        print(f"  torch 2:4 path unavailable at {n}x{k}, M={m}: {type(e).__name__}: {str(e)[:80]}")
    return out


def bench_shape(n: int, k: int, m: int, roofline: float, tol: float = 3e-2) -> list[dict]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    act = m * k * 2 + m * n * 2
    rows, base = [], None
    first = weights(n, k, g)
    copies = copies_for(n * k // 4)
    pool = [first] + [weights(n, k, g) for _ in range(copies - 1)]
    for name, (call, ref, nbytes) in kernels_at(n, k).items():
        err, tune = None, None
        if ref is not None:  # the tuned kernel checked on this shape before it is timed
            want = ref(x, first).float()
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = call(x, first)  # the first call at this shape: autotunes (or reads Triton's cache)
            torch.cuda.synchronize()
            tune = round(time.perf_counter() - start, 2)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
        tiles = chosen_tiles(name)
        wb = nbytes(first)
        use = pool[: copies_for(wb)]
        t, eager = timed([lambda w=w: call(x, w) for w in use])
        rows.append(row(name, m, n, k, t, eager, wb + act, roofline, err, tol) | {"tiles": tiles, "first call s": tune})
        if base is None:
            base = t
    for name, (call, objs, wb) in torch_peers(n, k, m, copies_for(n * k // 2), g).items():
        t, eager = timed([lambda o=o: call(x, o) for o in objs])
        rows.append(row(name, m, n, k, t, eager, wb + act, roofline, None, tol) | {"tiles": "", "first call s": None})
    for r in rows:
        r["speedup vs bf16"] = round(base / (r["us"] / 1e6), 2)
    return rows


def chosen_tiles(name: str) -> str:
    """The autotuned config our kernel ran with last (BLOCK_M x N x K, split, warps, stages, and the
    2:4 GEMV's mode when the config names one: mode 0, pairs of units, is the default)."""
    from kernels import sparse24, wna16

    run = {"ours W4A16": wna16._wna16_run, "ours W8A16": wna16._wna16_run}.get(
        name, sparse24._sparse24_run if name.startswith("ours 2:4") else None)
    cfg = getattr(run, "best_config", None)
    if cfg is None:
        return ""
    kw = cfg.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} split{kw.get('SPLIT', '-')} "
            f"w{cfg.num_warps} s{cfg.num_stages}" + (f" mode{kw['GEMV_MODE']}" if "GEMV_MODE" in kw else ""))


def row(name, m, n, k, t, eager, nbytes, roofline, err, tol) -> dict:
    gbs = nbytes / t / 1e9
    return {"kernel": name, "M": m, "N": n, "K": k, "us": round(t * 1e6, 2), "eager us": round(eager * 1e6, 2),
            "GB/s": round(gbs, 1), "% roofline": round(100 * gbs / (roofline * 1e3), 1),
            "TFLOP/s": round(2 * m * n * k / t / 1e12, 2),
            "rel err": "" if err is None else (f"{err:.1e}" if err <= tol else f"MISMATCH {err:.1e}")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--tag", default="kernels")
    args = ap.parse_args()
    import torch
    import triton

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
            for r in rows[-7:]:
                print({c: r[c] for c in ("kernel", "M", "N", "K", "us", "eager us", "% roofline", "rel err")}, flush=True)
    from compress.tracking import format_table

    bad = [r for r in rows if str(r["rel err"]).startswith("MISMATCH")]
    md = (f"Kernel speed on {device} (HBM roofline taken as {roofline} TB/s), bf16 activations, torch "
          f"{torch.__version__}, triton {triton.__version__}. `us`: median over 20 replays of a CUDA graph "
          "that calls the kernel on enough copies of the weight (>= 256 MB) that none is served from L2; "
          "`eager us`: the same calls from Python (launch overhead included). GB/s counts weight + metadata + "
          "scales + activations read and the output written. `rel err`: our tuned kernel against its "
          "PyTorch reference on the same inputs (max |err| / max |ref|). `first call s`: that first call, "
          "which autotunes the shape (all tiles tried) unless Triton's cache already holds it."
          f"\nCommand: python benchmarks/kernels.py "
          f"--batches {args.batches} --shapes {args.shapes}\n\n" + format_table(rows, list(rows[0])) + "\n")
    write_results(args.tag, {"device": device, "roofline_tbs": roofline, "torch": torch.__version__,
                             "triton": triton.__version__, "rows": rows}, md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

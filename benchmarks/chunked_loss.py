"""Peak memory and time of the KD loss, naive vs chunked (compress.chunked_loss), at SmolLM2's vocabulary.

    .venv/bin/python benchmarks/chunked_loss.py [--tokens 1024,2048,4096,8192] [--chunk 1024] [--device cpu] [--liger]

One forward + backward of forward-KL distillation from final hidden states (D = 576) through a
student LM head and a frozen teacher head (V = 49,152), at several B·T. Naive: both heads' full
logits, then ``kd_loss``. Chunked: ``chunked_head_loss`` + ``KDTerms``, ``--chunk`` tokens at a time.
``--liger``: also Liger-Kernel's ``LigerFusedLinearJSD`` (beta 0: forward KL), which ``distill.chunk_backend:
liger`` calls (its own chunking; a CUDA device).
Peak memory is what the loss adds above its inputs (the hidden states and the heads): on CUDA
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement), each (method, B·T) in a fresh process so one
measurement cannot hold memory for the next. Time: median of 3 (after a warm-up). The gradient of the
student head (V x D fp32) is in both. Goal (issue 18): >= 6x less peak memory, no slower.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

V, D = 49152, 576


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(method: str, n: int, chunk: int, device: str) -> dict:
    """One (method, N) in this process: peak extra bytes and median seconds of forward + backward."""
    import torch

    from compress.chunked_loss import KDTerms, chunked_head_loss
    from compress.losses import kd_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    head = torch.nn.Linear(D, V, bias=False, device=dev)
    t_head = torch.nn.Linear(D, V, bias=False, device=dev).requires_grad_(False)
    h_s = torch.randn(n, D, device=dev, requires_grad=True)
    h_t = torch.randn(n, D, device=dev)
    terms = KDTerms(kind="forward_kl")
    kw = dict(mask=None, labels=None, n_mask=torch.tensor(n, device=dev), n_labels=None)

    def step():
        head.weight.grad = h_s.grad = None
        if method == "naive":
            loss = kd_loss(head(h_s), t_head(h_t))
        elif method == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            loss = LigerFusedLinearJSD(jsd_beta=0.0)(h_s, head.weight, h_t, t_head.weight, None)
        else:
            def fn(logits, rows):
                with torch.no_grad():
                    t = t_head(h_t[rows])
                return terms(logits, [(1.0, {"teacher_logits": t})], rows, **kw)
            loss = chunked_head_loss(h_s, head, fn, chunk)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    step()  # warm-up (allocator, kernels)
    head.weight.grad = h_s.grad = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS:") * 1024
    value = step()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kb("VmHWM:") * 1024) - base
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"method": method, "tokens": n, "peak_bytes": peak, "seconds": statistics.median(times), "loss": value,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: method,N in a fresh process
    ap.add_argument("--tag", default="chunked_loss")
    ap.add_argument("--liger", action="store_true", help="also time Liger-Kernel's fused linear JSD (CUDA)")
    args = ap.parse_args()
    if args.one:
        method, n = args.one.split(",")
        print(json.dumps(measure(method, int(n), args.chunk, args.device)))
        return 0

    from benchmarks.common import write_results
    from compress.tracking import format_table

    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        got = {}
        for method in ("naive", "chunked", "liger") if args.liger else ("naive", "chunked"):
            p = subprocess.run([sys.executable, __file__, "--one", f"{method},{n}", "--chunk", str(args.chunk),
                                "--device", args.device], capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                sys.exit(f"error: {method} at {n} tokens failed:\n{p.stderr[-2000:]}")
            got[method] = json.loads(p.stdout.strip().splitlines()[-1])
        nv, ch = got["naive"], got["chunked"]
        assert abs(nv["loss"] - ch["loss"]) <= 1e-4 * abs(nv["loss"]), (nv["loss"], ch["loss"])
        rows.append({"B·T": n, "naive peak MB": round(nv["peak_bytes"] / 2**20), "chunked peak MB":
                     round(ch["peak_bytes"] / 2**20), "memory ratio": round(nv["peak_bytes"] / max(ch["peak_bytes"], 1), 2),
                     "naive s": round(nv["seconds"], 3), "chunked s": round(ch["seconds"], 3),
                     "time ratio (chunked/naive)": round(ch["seconds"] / nv["seconds"], 3), "threads": nv["threads"]})
        if "liger" in got:
            lg = got["liger"]
            assert abs(nv["loss"] - lg["loss"]) <= 1e-3 * abs(nv["loss"]), (nv["loss"], lg["loss"])
            rows[-1].update({"liger peak MB": round(lg["peak_bytes"] / 2**20), "liger s": round(lg["seconds"], 3),
                             "time ratio (liger/naive)": round(lg["seconds"] / nv["seconds"], 3)})
        print(rows[-1], flush=True)
    device = args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)"
    cols = list(rows[0])
    md = "\n".join([
        f"KD loss forward + backward, naive vs chunked ({args.chunk} tokens a chunk), V = {V:,}, D = {D}, fp32, on {device}.",
        f"Command: .venv/bin/python benchmarks/chunked_loss.py --tokens {args.tokens} --chunk {args.chunk} --device {args.device}"
        + (" --liger" if args.liger else ""),
        "", "Peak: memory added above the inputs during one step (CPU: peak RSS in a fresh process per cell). "
        "Time: median of 3 steps. The two losses agree to 1e-4 (checked).", "", format_table(rows, cols), ""])
    write_results(args.tag, {"args": vars(args), "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The device checks in one script (a lent GPU machine: torch + triton installed, nothing fetched):
# kernels against their references (fixed tiles, fp16 and bf16), the kernel benchmark (autotuned,
# each kernel re-checked on its shape), the chunked-loss benchmark on CUDA; with the teacher
# carried (scripts/device_payload.sh), the CUDA-only tests (graphs) and the end-to-end decode
# benchmark. Logs and results go to $OUT (or ./gpu_out). Each step has its own time limit, so one
# that hangs leaves the others.
#     bash scripts/gpu_check.sh [steps...]   steps: selftest kernels chunked graphs decode qat sweep
#                                            (default: the first three)
# qat (needs the whole payload: teacher, data, deepspeed): the QAT benchmark's arms in $QAT_ARMS
# (default: QAT from GPTQ with and without block-wise reconstruction, every float format, with their
# RTN baselines) over 3 seeds, 6 at once. sweep: benchmarks/$SWEEP.py $SWEEP_ARGS, 6 runs at once.
# Several at once on one GPU: one invocation each, in the background, with its own OUT=$OUT/<name>
# (and SWEEP_TAG), e.g. the qat step beside SWEEP=gqa and SWEEP=on_policy, then `wait`.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
steps=${*:-selftest kernels chunked}
[ -d /tmp/keep/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/keep/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Liger-Kernel beside our chunked loss, when its wheel is carried (run(carry=[".gpu/liger"]) after
# `pip download --no-deps liger-kernel==0.8.5 -d .gpu/liger` here): a pure-Python wheel
for w in .gpu/liger/liger_kernel-*.whl; do
  [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/liger "$w" && export PYTHONPATH=$PYTHONPATH:/tmp/liger
done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# A method benchmark's sweep, $SWEEP_JOBS (6) runs at once under a time limit; when cut short it aggregates
# what finished. Results to $OUT.   bench_sweep BENCH LIMIT_S TAG LOG [benchmark args...]
bench_sweep() {
  local bench=$1 limit=$2 tag=$3 log=$4 rc
  shift 4
  timeout "$limit" python3 "benchmarks/$bench.py" "$@" --jobs "${SWEEP_JOBS:-6}" --runs "/tmp/bench_$bench" --tag "$tag" > "$log" 2>&1
  rc=$?
  [ $rc = 0 ] || python3 "benchmarks/$bench.py" "$@" --runs "/tmp/bench_$bench" --tag "$tag" --aggregate >> "$log" 2>&1
  cp "benchmarks/results/$tag".* "$OUT/" 2>/dev/null
  # every run's metrics and log, finished or cut short (a cut run's evals so far are its only record)
  (cd "/tmp/bench_$bench" && find . -name metrics.jsonl -o -name '*.log' | tar -czf "$OUT/${tag}_runs.tgz" -T -) 2>/dev/null
  return $rc
}
for step in $steps; do
  start=$(date +%s)
  case $step in
    selftest) { timeout 150 python3 -m kernels.selftest --dtype fp16 && timeout 120 python3 -m kernels.selftest --dtype bf16; } > "$OUT/selftest.log" 2>&1
              rc=$? ;;
    kernels) timeout 300 python3 benchmarks/kernels.py ${KERNEL_ARGS:-} > "$OUT/kernels.log" 2>&1
             rc=$?; cp benchmarks/results/kernels.* "$OUT/" 2>/dev/null ;;
    chunked) liger=$(python3 -c "import liger_kernel" 2>/dev/null && echo --liger)  # liger-kernel: a carried wheel
             timeout 150 python3 benchmarks/chunked_loss.py --device cuda --tokens ${CHUNK_TOKENS:-4096,16384} \
               --chunk 2048 $liger --tag chunked_loss_cuda > "$OUT/chunked.log" 2>&1
             rc=$?; cp benchmarks/results/chunked_loss_cuda.* "$OUT/" 2>/dev/null ;;
    graphs) # the CUDA-only tests that need the payload: CUDA-graph decoding and sampling, GPTQ/SparseGPT on CUDA
            timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speculative.py tests/test_on_policy.py \
              tests/test_qat.py tests/test_sparsity.py -k "cuda or static" > "$OUT/graphs.log" 2>&1
            rc=$? ;;
    decode) timeout ${DECODE_TIMEOUT:-400} python3 benchmarks/decode.py ${DECODE_ARGS:---in-memory int4,s24int4 --synthetic 8} \
              --tag decode_cuda > "$OUT/decode.log" 2>&1
            rc=$?; cp benchmarks/results/decode_cuda.* "$OUT/" 2>/dev/null ;;
    qat) arms=${QAT_ARMS:-rtn_int4_g64,gptq_blockwise_int4_g64,qat_kd_gptq_int4_g64,qat_kd_gptq_blockwise_int4_g64,rtn_fp8,rtn_nvfp4,rtn_mxfp4,qat_kd_fp8,qat_kd_nvfp4,qat_kd_mxfp4,qat_kd_gptq_nvfp4,qat_kd_gptq_mxfp4,qat_kd_gptq_int4_g64_600,qat_kd_gptq_blockwise_int4_g64_600}
         bench_sweep qat_kd "${QAT_TIMEOUT:-540}" qat_formats_cuda "$OUT/qat.log" --arms "$arms" --seeds 0,1,2
         rc=$? ;;
    sweep) # any method sweep, e.g. SWEEP=upcycle SWEEP_ARGS="--arms dense,moe_copy --seeds 0,1,2" (needs the payload)
           [ -n "${SWEEP:-}" ] || { echo "sweep: set SWEEP to a benchmark (gqa, on_policy, prune_kd, qat_kd, sparsity, upcycle)"; continue; }
           bench_sweep "$SWEEP" "${SWEEP_TIMEOUT:-540}" "${SWEEP_TAG:-${SWEEP}_cuda}" "$OUT/sweep.log" ${SWEEP_ARGS:-}
           rc=$? ;;
    *) echo "unknown step $step (selftest, kernels, chunked, graphs, decode, qat, sweep)"; continue ;;
  esac
  echo "$step: rc=$rc $(( $(date +%s) - start )) s"; tail -4 "$OUT/$step.log" 2>/dev/null
done
# The device tool brings back only a few files a call (the rest are left out by count): everything
# this script wrote goes into one archive, $OUT/results.tgz (tar -xzf it here)
(cd "$OUT" && find . -type f ! -name results.tgz -print0 | tar -czf results.tgz --null -T - --remove-files) \
  && echo "packed into $OUT/results.tgz"

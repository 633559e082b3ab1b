#!/usr/bin/env bash
# CI's second job: the test suite (the real-model tests aside) on the lowest torch and transformers that
# pyproject.toml declares, in a venv over the installed environment, so a bound that stops being true fails CI.
# transformers 5.16 itself needs torch>=2.6, so 2.6 is the floor; on PyPI that is a CUDA build (about 3 GB with
# its nvidia libraries), which runs on the CPU here. torch 2.6 pins triton 3.2, whose interpreter
# (TRITON_INTERPRET=1, how the kernel tests run without a GPU) needs numpy<2.3 (newer numpy refuses its int()
# of a one-element array), so the venv takes numpy 2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r torch_low tf_low < <(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
low = {re.match(r"[\w-]+", d).group(0): re.search(r">=([\d.]+)", d).group(1) for d in deps if ">=" in d}
print(low["torch"], low["transformers"])
PY
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT  # the venv is ~5 GB: runs that leave it behind fill the disk
venv=$tmp/venv
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "torch==$torch_low" "transformers==$tf_low" "numpy<2.3"
"$venv/bin/python" - <<'PY'
import torch, transformers, triton, numpy
print(f"lowest: torch {torch.__version__}, transformers {transformers.__version__} "
      f"(triton {triton.__version__}, numpy {numpy.__version__})")
PY
# torchrun: one smoke test here (eval-ppl over 2 gloo processes); the main job runs them all (CI time)
"$venv/bin/python" -m pytest -q -p no:cacheprovider -k "not smollm2 and (not torchrun or eval_ppl)"

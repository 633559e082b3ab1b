#!/usr/bin/env bash
# CI's second job: the version-sensitive tests (MoE layouts, checkpoint key conversion, multimodal classes,
# tokenizer loading, packing) on the lowest transformers pyproject.toml declares, in a venv over the installed
# environment (same torch), so a bound that stops being true fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
low=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.search(r">=([\d.]+)", d).group(1) for d in deps if d.startswith("transformers")))
PY
)
venv=$(mktemp -d)/venv
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==$low"
echo "lowest transformers: $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_pack.py tests/test_data.py \
    tests/test_multimodal.py tests/test_hub.py

#!/usr/bin/env bash
# CI's second job: the test suite (the real-model tests aside) on the lowest torch and transformers that
# pyproject.toml declares, in a venv over the installed environment (the active venv that scripts/install.sh
# made: .ci/run activates it), so a bound that stops being true fails CI.
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
# over the installed environment: a venv's packages are no "system site" for a venv made from it (that would be
# the base interpreter's), so a .pth file adds the installed environment's site directories (their .pth files,
# the editable llmprune's among them, run too) behind the new venv's own, which the lowest versions shadow
python -m venv "$venv"
python - "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'PY'
import pathlib, sys
dirs = [p for p in sys.path if p.endswith("site-packages")]
pathlib.Path(sys.argv[1], "_installed_env.pth").write_text(
    "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
PY
"$venv/bin/python" -m pip install -q "torch==$torch_low" "transformers==$tf_low" "numpy<2.3"
"$venv/bin/python" - <<'PY'
import torch, transformers, triton, numpy
print(f"lowest: torch {torch.__version__}, transformers {transformers.__version__} "
      f"(triton {triton.__version__}, numpy {numpy.__version__})")
PY
# torchrun: one smoke test here (eval-ppl over 2 gloo processes); the main job runs them all (CI time).
# Left to the main job too, as they exercise llmprune's own plumbing, not torch's or transformers' APIs: the
# install script, signals and locks, resume journals, offline/hub probing, the docs and bad-input tables, and the
# golden digests (recorded on the newest torch only)
skip=(--ignore=tests/test_install.py --ignore=tests/test_faults.py --ignore=tests/test_resume.py
      --ignore=tests/test_offline.py --ignore=tests/test_hub.py --ignore=tests/test_docs.py
      --ignore=tests/test_bad_input.py --ignore=tests/test_golden.py)
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${skip[@]}" -k "not smollm2 and (not torchrun or eval_ppl)"

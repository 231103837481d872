#!/usr/bin/env bash
# Installs distributed-training into ./.venv and puts the offline corpus and tokenizer in place.
# Safe to run again: every step checks before it changes anything.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages on a CPU machine.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -e ".[test]"
# p2pd executable, no nest_asyncio, uvloop usable, offline corpus and tokenizer in place.
.venv/bin/python post_install.py
echo "install: done (.venv ready; run .venv/bin/dt-local-swarm or .venv/bin/python -m pytest -q)"

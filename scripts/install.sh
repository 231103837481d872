#!/usr/bin/env bash
# Installs distributed-training into ./.venv and puts the offline corpus and tokenizer in place.
# Safe to run again: every step checks before it changes anything.
#
# Environment: PYTHON (the interpreter that creates ./.venv; default python3), TORCH_VERSION (the
# torch installed when the environment has none; default 2.13.0), DT_PYTHON (install into the
# environment of this interpreter instead: ./.venv is then neither created nor used; the pm2
# launchers pass theirs), DT_POST_INSTALL=0 (skip post_install.py: the launchers run it themselves,
# under their own time limit).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DT_PYTHON:-}" ]; then
  VENV_PY=$DT_PYTHON
  if [ ! -x "$VENV_PY" ]; then
    echo "install: DT_PYTHON=$VENV_PY is not an executable python" >&2
    exit 1
  fi
else
  PYTHON=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  VENV_PY=.venv/bin/python
fi
PIP=("$VENV_PY" -m pip --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages on a CPU machine.
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -e ".[test]"
# p2pd executable, no nest_asyncio, uvloop usable, offline corpus and tokenizer in place.
if [ "${DT_POST_INSTALL:-1}" != 0 ]; then
  "$VENV_PY" post_install.py
fi
if [ -n "${DT_PYTHON:-}" ]; then
  echo "install: done (installed into the environment of $VENV_PY)"
else
  echo "install: done (.venv ready; run .venv/bin/dt-local-swarm or .venv/bin/python -m pytest -q)"
fi

#!/usr/bin/env bash
# Create .venv with kltrain and its dependencies, once. Quick when already done.
#
# torch: a machine whose python3 already imports torch keeps it (the venv sees the system
# site-packages, so a cluster's CUDA build is never replaced); a fresh CPU machine gets the
# CPU build torch==2.13.0. Re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.kltrain-installed
WANT=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "bootstrap: using the torch already installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0 (CPU build)"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
fi
echo "bootstrap: installing kltrain and its dependencies into $VENV"
# deepspeed: ~10 s from its sdist, pure Python (no ops built); tests/test_deepspeed.py needs it
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev,deepspeed]"
echo "$WANT" > "$STAMP"

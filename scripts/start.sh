#!/usr/bin/env bash
# First command of the README: set everything up (once) and launch the app on the embedded Shapes model.
# Extra arguments go to app.py, e.g. `bash scripts/start.sh --model stabilityai/sd-turbo --device cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.installed-requirements 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  cp requirements.txt .venv/.installed-requirements
fi
exec .venv/bin/python app.py "$@"

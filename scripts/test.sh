#!/usr/bin/env bash
# Second command of the README: set up (once) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k steps`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
cat requirements.txt requirements-dev.txt > .venv/.wanted
if ! cmp -s .venv/.wanted .venv/.installed-dev 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  cp .venv/.wanted .venv/.installed-dev
  cp requirements.txt .venv/.installed-requirements
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "note: /usr/bin/chromium is missing, browser tests will be skipped (apt-get install chromium)" >&2
fi
# One torch thread per test process, and two test processes (pytest-xdist; FINETUNERS_TEST_WORKERS=0 runs in one):
# many tests spend their time waiting on an app or trainer they started, which then runs beside the other worker.
# OpenMP threads that outnumber free cores spin at every barrier (measured: a 30 s test took over 600 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n "${FINETUNERS_TEST_WORKERS:-2}" --dist worksteal "$@"

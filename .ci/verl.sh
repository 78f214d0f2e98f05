#!/usr/bin/env bash
# The verl integration's tests against the real verl==0.9.1, in a virtualenv of their own (verl pins
# transformers<5.11; the main environment has 5.24.0). Builds build/venv-verl from requirements/verl.txt,
# installs this package into it (no C++ build: the torch backend serves; the entry point verl.plugins is what
# matters), and runs tests/verl. --confcutdir: verl's wheel installs a top-level `tests` package that shadows
# ours, so only tests/verl/conftest.py is loaded.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=build/venv-verl

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --no-cache-dir -r requirements/verl.txt
CREDIT_SKIP_EXT=1 "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "verl venv install: $(( $(date +%s) - start )) s"

set +e
VERL_USE_EXTERNAL_PLUGINS=auto OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider --confcutdir=tests/verl tests/verl
rc=$?
set -e
echo "verl CI wall time: $(( $(date +%s) - start )) s"
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no verl tests (exit 5): failing" >&2
  exit 1
fi
exit $rc

#!/usr/bin/env bash
# Set up .venv on a fresh CPU machine from the project's own files: pinned requirements, the embedded model's
# package and the peer kernels (--no-deps), then an editable install that builds credit_kernels._C (C++).
# Used by the README's first commands, examples/demo.sh and .ci/run. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --no-cache-dir -r requirements/ci.txt
pip install -q --no-cache-dir --no-deps -r requirements/extras.txt
pip install -q --no-build-isolation -e .

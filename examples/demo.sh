#!/usr/bin/env bash
# One command on a fresh CPU machine: install everything from the project's files, then a short default
# CREDIT run on the embedded SmolLM2-135M that prints held-out accuracy before and after and writes
# runs/demo/curves.png. Extra arguments go to `credit train` (e.g. --method sdpo --max-steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -r requirements/ci.txt
pip install -q --no-deps -r requirements/extras.txt
pip install -q --no-build-isolation -e .
credit train --output runs/demo "$@"

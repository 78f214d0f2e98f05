#!/usr/bin/env bash
# One command on a fresh CPU machine: install everything from the project's files (scripts/setup.sh), then the
# default CREDIT run on the embedded SmolLM2-135M, which prints held-out accuracy before and after and writes
# runs/demo/curves.png. Extra arguments go to `credit train` (e.g. --method sdpo --max-steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
credit train --output runs/demo "$@"

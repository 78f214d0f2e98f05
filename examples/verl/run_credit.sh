#!/usr/bin/env bash
# Launch CREDIT on verl 0.9.1 (Ray + FSDP + vLLM) with examples/verl/credit_trainer.yaml.
# One node:   bash examples/verl/run_credit.sh
# More nodes: start a Ray cluster (ray start --head / ray start --address=...), then
#             bash examples/verl/run_credit.sh trainer.nnodes=4
# Any verl override can follow, e.g. actor_rollout_ref.model.path=Qwen/Qwen3-1.7B distillation.distillation_loss.lam=0.25
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m verl.trainer.main_ppo --config-path "$PWD/examples/verl" --config-name credit_trainer "$@"

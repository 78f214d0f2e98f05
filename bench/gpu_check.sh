#!/usr/bin/env bash
# One prepared GPU run (< 6 min): build the extension, run the GPU tests, run the benchmarks, write JSON.
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or bench/results/
# Peer wheels (liger-kernel, cut-cross-entropy) are installed from ./wheels/ when present (no internet there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
start=$(date +%s)
if compgen -G "wheels/*.whl" >/dev/null; then pip install -q --no-deps wheels/*.whl; fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python -m credit env | tee "$OUT/env.txt"
echo "build: $(( $(date +%s) - start )) s"
timeout 100 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
echo "gpu tests: $(( $(date +%s) - start )) s"
timeout 110 python bench/bench_logprob.py --out "$OUT/logprob_gpu.json" 2>&1 | tee "$OUT/bench_logprob.txt" | tail -40
timeout 40 python bench/bench_topk.py --out "$OUT/topk_gpu.json" 2>&1 | tail -20
timeout 20 python bench/bench_credit_reward.py --out "$OUT/credit_reward_gpu.json" 2>&1 | tail -10
timeout 60 python bench/bench_scoring.py --out "$OUT/scoring_gpu.json" 2>&1 | tail -20
echo "total: $(( $(date +%s) - start )) s"

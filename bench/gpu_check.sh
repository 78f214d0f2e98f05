#!/usr/bin/env bash
# One prepared GPU run: build the extension, run the kernel tests on the GPU, sweep and run the benchmarks.
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or bench/results/gpu/
#   STAGES="build tests logprob" bash bench/gpu_check.sh  # a subset, in this order: build tests trainer retest
#                                                          #   sweep sweep_kernels topk scoring credit_reward tree
#                                                          #   logprob update update_ckpt trl
#   RETEST="tests/x.py::test_y ..." STAGES="build retest" bash bench/gpu_check.sh   # full tracebacks of a few tests
# Each stage has its own timeout, so one slow or broken stage never hides the others. Stage times on an H200
# (2026-11-27): build 42 s, tests 109 s, sweep 23 s, topk (2 shapes) 91 s, scoring anchors 70 s + sdpo > 100 s,
# credit_reward 24 s, tree 28 s, logprob (6 shapes, no compiled peer) 64 s. All stages exceed one 10-minute call:
# split them over two calls (e.g. STAGES="build tests trainer sweep logprob", then "build topk scoring ..."). Everything is logged to
# $OUT/log.txt; each benchmark writes its JSON into $OUT (plots are made later from the JSON, off the card).
# Peer wheels (liger-kernel, cut-cross-entropy) are installed from ./.whl/ when present (no internet there).
# The trainer stage needs SmolLM2's tokenizer files (the embedded model's 93 MB wheel is too big to carry):
#   python -c "from tests.utils import save_test_tokenizer; save_test_tokenizer('.gpu_assets/tokenizer')"
# then carry .gpu_assets with the call. The trl stage needs trl==1.16.0's wheel in ./.whl/ (pip download --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
STAGES=${STAGES:-"build tests trainer sweep sweep_kernels topk scoring credit_reward tree logprob update update_ckpt trl"}
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
start=$(date +%s)
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

stamp "start: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if has build; then
  stamp build
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout 240 \
    $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20
fi
$PY -m credit env
if has tests; then
  stamp tests
  # the kernel suites run their Triton cases on the GPU when CUDA is there (tests/utils.py TRITON_DEVICE)
  timeout 200 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --maxfail 30 \
    tests/test_linear_logprob.py tests/test_linear_topk.py tests/test_linear_gather.py tests/test_credit_reward.py \
    tests/test_rewards.py tests/test_tree_attention.py tests/test_tree_attention_backward.py tests/test_views.py \
    tests/test_autocast.py tests/test_scorer.py 2>&1 | tail -60
fi
if has trainer; then
  stamp trainer
  # the training loop on CUDA (bf16, Triton scoring, fused ops) with a tiny random Llama: every method, resume
  if [ -f .gpu_assets/tokenizer/tokenizer.json ]; then
    CREDIT_TEST_TOKENIZER=$PWD/.gpu_assets/tokenizer timeout 150 $PY -m pytest -q -p no:cacheprovider --timeout 120 \
      tests/test_trainer.py tests/test_rollouts.py tests/test_pipeline.py tests/test_packed_student.py 2>&1 | tail -30
  else
    echo "trainer stage skipped: no .gpu_assets/tokenizer (see the top of this script)"
  fi
fi
if has retest; then
  stamp retest
  timeout 150 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --tb=long ${RETEST:-tests} \
    > "$OUT/retest.txt" 2>&1
  tail -15 "$OUT/retest.txt"
fi
if has sweep; then
  stamp sweep
  timeout 90 $PY bench/sweep_logprob.py --out "$OUT/sweep_logprob.json"
fi
if has sweep_kernels; then
  stamp sweep_kernels
  # dz (backward), top-k, gather, tree attention and credit_reward launch configs (bench/sweep_kernels.py)
  timeout 240 $PY bench/sweep_kernels.py --out "$OUT/sweep_kernels.json" ${SWEEP_ARGS:-}
fi
if has scoring; then
  stamp scoring
  timeout 100 $PY bench/bench_scoring.py --no-plot --out "$OUT/scoring.json" ${SCORING_ARGS:-}
fi
if has topk; then
  stamp topk
  timeout 90 $PY bench/bench_topk.py --no-plot --out "$OUT/topk.json" ${TOPK_ARGS:-}
fi
if has credit_reward; then
  stamp credit_reward
  timeout 40 $PY bench/bench_credit_reward.py --no-plot --out "$OUT/credit_reward.json"
fi
if has tree; then
  stamp tree
  timeout 60 $PY bench/bench_tree_attention.py --quick --out "$OUT/tree_attention.jsonl"
fi
if has logprob; then
  stamp logprob
  timeout 150 $PY bench/bench_logprob.py --no-plot --out "$OUT/logprob.json" \
    --providers ${LOGPROB_PROVIDERS:-matmul,naive,chunked,compiled,liger,cce,credit} ${LOGPROB_ARGS:-}
fi
if has update; then
  stamp update
  # the student update, packed prompt sharing vs padded, at ANCHORS section 2's shape (Qwen2-1.5B, random, bf16)
  timeout 300 $PY bench/bench_update.py --workloads gpu --device cuda --no-plot --out "$OUT/update.json"
fi
if has update_ckpt; then
  stamp update_ckpt
  # the same under activation checkpointing (TRL's default): the packed path's backward replays run in the trie
  timeout 300 $PY bench/bench_update.py --workloads gpu --device cuda --no-plot --checkpointing \
    --out "$OUT/update_checkpointing.json"
fi
if has trl; then
  stamp trl
  # stock TRL SDPOTrainer step vs CreditSDPOTrainer at M = 0, 1, 3 (Qwen2-1.5B-shaped, bf16)
  TRL_EXPERIMENTAL_SILENCE=1 timeout 300 $PY bench/bench_trl.py --out "$OUT/trl.json"
fi
stamp done

// Shared by the CPU kernels of the linear + log-softmax family (linear_logprob.cpp, linear_topk.cpp):
// argument checks, the accumulation dtype and the row-chunk size that bounds memory to chunk x V.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must be " #n "-D, got shape ", (x).sizes())

namespace credit {

// hidden [N, d] and weight [V, d]: CPU, 2-D, same d and dtype, V >= 1.
inline void check_matrices(const at::Tensor& hidden, const at::Tensor& weight) {
  CHECK_CPU(hidden);
  CHECK_CPU(weight);
  CHECK_DIM(hidden, 2);
  CHECK_DIM(weight, 2);
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden [N, d] and weight [V, d] must share d; got ", hidden.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must have the same dtype; got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.size(0) > 0, "weight must have V >= 1 rows");
}

// fp64 inputs stay fp64 (the tests' oracle dtype); everything else accumulates in fp32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per chunk: ~64 Mi fp32 logits (256 MiB), at least 16 rows, unless the caller fixes it.
inline int64_t pick_chunk(int64_t chunk_rows, int64_t vocab) {
  if (chunk_rows > 0) return chunk_rows;
  return std::max<int64_t>(16, std::min<int64_t>(1024, (int64_t(64) << 20) / std::max<int64_t>(vocab, 1)));
}

}  // namespace credit

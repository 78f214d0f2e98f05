// Shared by the CPU kernels of the linear + log-softmax family (linear_logprob.cpp, linear_topk.cpp):
// argument checks, the accumulation dtype and the row-chunk size that bounds memory to chunk x V.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

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

// The chunked backward of every op in the family: per row chunk, z = h W^T in the accumulation dtype,
// fill_dz(z, start, rows) turns z into d loss / d z in place (the op-specific part), then
// d_hidden[rows] = dz W and d_weight += dz^T h. Gradients come back in the inputs' dtypes; an unneeded one is
// an empty tensor. Extra memory: one chunk x V block.
template <typename FillDz>
std::tuple<at::Tensor, at::Tensor> chunked_linear_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                                           bool needs_hidden_grad, bool needs_weight_grad,
                                                           int64_t chunk_rows, FillDz&& fill_dz) {
  const int64_t n = hidden.size(0), vocab = weight.size(0), d = hidden.size(1);
  const auto acc = acc_type(hidden);
  at::Tensor d_hidden =
      needs_hidden_grad ? at::empty({n, d}, hidden.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor d_weight =
      needs_weight_grad ? at::zeros({vocab, d}, weight.options().dtype(acc)) : at::empty({0}, weight.options());
  if (n > 0 && (needs_hidden_grad || needs_weight_grad)) {
    const at::Tensor w = weight.to(acc).contiguous();
    const int64_t step = pick_chunk(chunk_rows, vocab);
    for (int64_t start = 0; start < n; start += step) {
      const int64_t rows = std::min(step, n - start);
      const at::Tensor h = hidden.narrow(0, start, rows).to(acc);
      at::Tensor z = at::mm(h, w.t()).contiguous();
      fill_dz(z, start, rows);
      if (needs_hidden_grad) {
        at::Tensor out = d_hidden.narrow(0, start, rows);
        at::mm_out(out, z, w);
      }
      if (needs_weight_grad) d_weight.addmm_(z.t(), h);
    }
  }
  return {needs_hidden_grad ? d_hidden.to(hidden.scalar_type()) : d_hidden,
          needs_weight_grad ? d_weight.to(weight.scalar_type()) : d_weight};
}

}  // namespace credit

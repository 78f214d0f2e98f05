// Shared by the CPU kernels of the linear + log-softmax family (linear_logprob.cpp, linear_topk.cpp): argument
// checks, the accumulation dtype, the row-chunk size that bounds memory to chunk x V, and the two chunked loops
// (forward and backward) around the op-specific row passes.
//
// Precision contract (as credit_kernels/_triton_utils.py): every row pass works on the tempered logits rounded to
// the accumulation dtype, zt = acc(z * (1 / T)), so the forward's row max is one of them, exactly; the forward
// returns that max and log_norm = log sum exp(zt - max) apart, and the backward forms p = exp((zt - max) - log_norm).
// Never exp(zt - lse) with a rounded lse: at |z| ~ 1e4 its rounding scales a whole row of p.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "checks.h"

namespace credit {

// hidden [N, d] and weight [V, d]: CPU, 2-D, same d and dtype, V >= 1.
inline void check_matrices(const char* op, const at::Tensor& hidden, const at::Tensor& weight) {
  CHECK_CPU(op, hidden);
  CHECK_CPU(op, weight);
  CHECK_DIM(op, hidden, 2);
  CHECK_DIM(op, weight, 2);
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": hidden [N, d] and weight [V, d] must share d; got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), op, ": hidden and weight must have the same dtype; got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have V >= 1 rows");
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

// The chunked forward of every op in the family: per row chunk, z = h W^T in the accumulation dtype (one
// MKL/oneDNN matmul; hidden and weight may have any strides), then row_pass(z, start, rows) reads the contiguous
// [rows, V] logits (the op-specific part, multi-threaded over rows).
template <typename RowPass>
void chunked_linear_forward(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk_rows,
                            RowPass&& row_pass) {
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  if (n == 0) return;
  const auto acc = acc_type(hidden);
  const at::Tensor w = weight.to(acc).contiguous();
  const int64_t step = pick_chunk(chunk_rows, vocab);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor z = at::mm(hidden.narrow(0, start, rows).to(acc), w.t()).contiguous();
    row_pass(z, start, rows);
  }
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

// The accumulation-dtype tempered logit every row pass uses (forward and backward alike).
template <typename scalar_t>
inline scalar_t tempered(scalar_t z, scalar_t inv_temp) {
  return scalar_t(z * inv_temp);
}

// Row max m and sum_exp = sum exp(zt - m) of one row's tempered logits (m exactly one of them; sums in double), and
// when ent_sum is given, sum exp(zt - m) (zt - m) too (the entropy is log(sum_exp) - ent_sum / sum_exp). An infinite
// max shifts by 0, as torch.logsumexp does (so inf - inf never happens); a NaN logit (skipped by std::max) makes the
// sum NaN.
template <typename scalar_t>
inline void row_stats(const scalar_t* row, int64_t vocab, scalar_t inv_temp, double& m, double& sum_exp,
                      double* ent_sum = nullptr) {
  m = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, double(tempered(row[v], inv_temp)));
  if (std::isinf(m)) m = 0.0;
  double s = 0.0, e = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double d = double(tempered(row[v], inv_temp)) - m;
    const double p = std::exp(d);
    s += p;
    if (ent_sum && p > 0) e += p * d;
  }
  sum_exp = s;
  if (ent_sum) *ent_sum = e;
}

}  // namespace credit

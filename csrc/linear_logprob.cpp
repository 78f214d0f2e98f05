// CPU gathered log-softmax over a large vocabulary: logp[i] = log softmax(h_i W^T / T)[y_i].
//
// Row chunks keep memory at chunk x V: each chunk's logits come from one MKL/oneDNN matmul, then one
// multi-threaded pass per row computes max, sum exp (in double), the target logit and the entropy.
// The backward recomputes each chunk's logits, turns them into dz in place, and applies two matmuls.
// Both sides follow the precision contract of linear_common.h (row max and log_norm kept apart).
// Python twin: credit_kernels/reference.py (linear_logprob_fwd_ref / linear_logprob_bwd_ref).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_common.h"

#include <cmath>
#include <tuple>

namespace credit {
namespace {

void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  check_matrices(op, hidden, weight);
  CHECK_CPU(op, targets);
  CHECK_DIM(op, targets, 1);
  TORCH_CHECK(targets.size(0) == hidden.size(0), op, ": targets must have shape [N] = [", hidden.size(0), "]; got ",
              targets.sizes());
  CHECK_INT64(op, targets);
}

template <typename scalar_t>
void fwd_rows(const scalar_t* z, int64_t rows, int64_t vocab, const int64_t* tgt, int64_t ignore_index,
              scalar_t inv_temp, bool want_entropy, scalar_t* logp, scalar_t* lse, scalar_t* row_max,
              scalar_t* log_norm, scalar_t* ent) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = tgt[r];
      if (y == ignore_index) {
        logp[r] = lse[r] = row_max[r] = log_norm[r] = 0;
        if (want_entropy) ent[r] = 0;
        continue;
      }
      TORCH_CHECK(y >= 0 && y < vocab, "linear_logprob_fwd: targets[", r, "] = ", y, " is outside [0, ", vocab, ")");
      const scalar_t* row = z + r * vocab;
      double m, s, e;
      row_stats(row, vocab, inv_temp, m, s, want_entropy ? &e : nullptr);
      const double log_s = std::log(s);
      row_max[r] = scalar_t(m);  // exact: m is one of the accumulation-dtype logits
      log_norm[r] = scalar_t(log_s);
      lse[r] = scalar_t(m + log_s);
      logp[r] = scalar_t((double(tempered(row[y], inv_temp)) - m) - log_s);
      if (want_entropy) ent[r] = scalar_t(log_s - e / s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    int64_t ignore_index, bool return_entropy, int64_t chunk_rows) {
  constexpr const char* op = "linear_logprob_fwd";
  check_inputs(op, hidden, weight, targets);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto opts = hidden.options().dtype(acc_type(hidden));
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor row_max = at::empty({n}, opts), log_norm = at::empty({n}, opts);
  at::Tensor ent = at::empty({return_entropy ? n : 0}, opts);
  const at::Tensor tgt = targets.contiguous();
  chunked_linear_forward(hidden, weight, chunk_rows, [&](const at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_logprob_fwd_cpu", [&] {
      auto at_start = [&](at::Tensor& t) { return t.data_ptr<scalar_t>() + start; };
      fwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, tgt.data_ptr<int64_t>() + start, ignore_index,
                         scalar_t(1.0 / temperature), return_entropy, at_start(logp), at_start(lse), at_start(row_max),
                         at_start(log_norm), return_entropy ? at_start(ent) : nullptr);
    });
  });
  return {logp, ent, lse, row_max, log_norm};
}

// In place: z (raw h W^T) becomes dz = d loss / d(h W^T) for one chunk.
template <typename scalar_t>
void bwd_rows(scalar_t* z, int64_t rows, int64_t vocab, const int64_t* tgt, int64_t ignore_index, scalar_t inv_temp,
              const scalar_t* row_max, const scalar_t* log_norm, const scalar_t* ent, const scalar_t* g_logp,
              const scalar_t* g_ent, const scalar_t* g_lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = z + r * vocab;
      const int64_t y = tgt[r];
      if (y == ignore_index) {
        std::fill(row, row + vocab, scalar_t(0));
        continue;
      }
      const double gl = g_logp ? double(g_logp[r]) : 0.0;
      const double ge = g_ent ? double(g_ent[r]) : 0.0;
      const double gs = g_lse ? double(g_lse[r]) : 0.0;
      const double m = double(row_max[r]), ln = double(log_norm[r]);
      const double h = g_ent ? double(ent[r]) : 0.0;
      const double it = double(inv_temp);
      for (int64_t v = 0; v < vocab; ++v) {
        const double log_p = (double(tempered(row[v], inv_temp)) - m) - ln;
        const double p = std::exp(log_p);
        double dz = (gs - gl) * p;
        if (g_ent) dz -= ge * p * (log_p + h);
        row[v] = scalar_t(dz * it);
      }
      row[y] += scalar_t(gl * it);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_bwd_cpu(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& row_max, const at::Tensor& log_norm, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, bool needs_hidden_grad, bool needs_weight_grad, int64_t chunk_rows) {
  constexpr const char* op = "linear_logprob_bwd";
  check_inputs(op, hidden, weight, targets);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  CHECK_SHAPE(op, row_max, n);
  CHECK_SHAPE(op, log_norm, n);
  const auto acc = acc_type(hidden);
  auto as_acc = [&](const c10::optional<at::Tensor>& g, const char* name) -> at::Tensor {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->dim() == 1 && g->size(0) == n, op, ": ", name, " must have shape [", n, "], got ", g->sizes());
    return g->to(acc).contiguous();
  };
  const at::Tensor gl = as_acc(grad_logp, "grad_logp"), ge = as_acc(grad_entropy, "grad_entropy"),
                   gs = as_acc(grad_lse, "grad_lse");
  TORCH_CHECK(!ge.defined() || entropy.size(0) == n, op, ": entropy from the forward is needed for grad_entropy");
  const at::Tensor tgt = targets.contiguous(), max_c = row_max.to(acc).contiguous(),
                   norm_c = log_norm.to(acc).contiguous();
  const at::Tensor ent_c = ge.defined() ? entropy.to(acc).contiguous() : at::Tensor();
  return chunked_linear_backward(hidden, weight, needs_hidden_grad, needs_weight_grad, chunk_rows,
                                 [&](at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_bwd_cpu", [&] {
      auto ptr = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() + start : nullptr; };
      bwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, tgt.data_ptr<int64_t>() + start, ignore_index,
                         scalar_t(1.0 / temperature), ptr(max_c), ptr(norm_c), ptr(ent_c), ptr(gl), ptr(ge), ptr(gs));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  m.def(
      "linear_logprob_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature, int ignore_index, "
      "bool return_entropy, int chunk_rows) -> (Tensor logp, Tensor entropy, Tensor lse, Tensor row_max, "
      "Tensor log_norm)");
  m.def(
      "linear_logprob_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor? grad_lse, Tensor hidden, Tensor weight, "
      "Tensor targets, Tensor row_max, Tensor log_norm, Tensor entropy, float temperature, int ignore_index, "
      "bool needs_hidden_grad, bool needs_weight_grad, int chunk_rows) -> (Tensor d_hidden, Tensor d_weight)");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) {
  m.impl("linear_logprob_fwd", &linear_logprob_fwd_cpu);
  m.impl("linear_logprob_bwd", &linear_logprob_bwd_cpu);
}

}  // namespace credit

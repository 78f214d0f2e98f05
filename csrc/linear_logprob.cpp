// CPU gathered log-softmax over a large vocabulary: logp[i] = log softmax(h_i W^T / T)[y_i].
//
// Row chunks keep memory at chunk x V: each chunk's logits come from one MKL/oneDNN matmul, then one
// multi-threaded pass per row computes max, sum exp (in double), the target logit and the entropy.
// The backward recomputes each chunk's logits, turns them into dz in place, and applies two matmuls.
// Python twin: credit_kernels/reference.py (linear_logprob_ref / linear_logprob_bwd_ref).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_common.h"

#include <cmath>
#include <tuple>

namespace credit {
namespace {

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  check_matrices(hidden, weight);
  CHECK_CPU(targets);
  CHECK_DIM(targets, 1);
  TORCH_CHECK(targets.size(0) == hidden.size(0), "targets must have shape [N] = [", hidden.size(0), "]; got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
}

template <typename scalar_t>
void fwd_rows(const scalar_t* z, int64_t rows, int64_t vocab, const int64_t* tgt, int64_t ignore_index,
              scalar_t inv_temp, bool want_entropy, scalar_t* logp, scalar_t* lse, scalar_t* ent) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = tgt[r];
      if (y == ignore_index) {
        logp[r] = 0;
        lse[r] = 0;
        if (want_entropy) ent[r] = 0;
        continue;
      }
      TORCH_CHECK(y >= 0 && y < vocab, "targets[", r, "] = ", y, " is outside [0, ", vocab, ")");
      const scalar_t* row = z + r * vocab;
      double m = -INFINITY;
      for (int64_t v = 0; v < vocab; ++v) m = std::max(m, double(row[v]) * inv_temp);
      double s = 0.0, e = 0.0;  // sum exp(z - m), sum exp(z - m) * (z - m)
      for (int64_t v = 0; v < vocab; ++v) {
        const double d = double(row[v]) * inv_temp - m;
        const double p = std::exp(d);
        s += p;
        if (want_entropy && p > 0) e += p * d;
      }
      const double log_s = std::log(s);
      lse[r] = scalar_t(m + log_s);
      logp[r] = scalar_t(double(row[y]) * inv_temp - m - log_s);
      if (want_entropy) ent[r] = scalar_t(log_s - e / s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_fwd_cpu(const at::Tensor& hidden,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& targets, double temperature,
                                                                       int64_t ignore_index, bool return_entropy,
                                                                       int64_t chunk_rows) {
  check_inputs(hidden, weight, targets);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor ent = at::empty({return_entropy ? n : 0}, opts);
  if (n == 0) return {logp, ent, lse};
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor tgt = targets.contiguous();
  const int64_t step = pick_chunk(chunk_rows, vocab);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor z = at::mm(hidden.narrow(0, start, rows).to(acc), w.t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_fwd_cpu", [&] {
      fwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, tgt.data_ptr<int64_t>() + start, ignore_index,
                         scalar_t(1.0 / temperature), return_entropy, logp.data_ptr<scalar_t>() + start,
                         lse.data_ptr<scalar_t>() + start, return_entropy ? ent.data_ptr<scalar_t>() + start : nullptr);
    });
  }
  return {logp, ent, lse};
}

// In place: z (raw h W^T) becomes dz = d loss / d(h W^T) for one chunk.
template <typename scalar_t>
void bwd_rows(scalar_t* z, int64_t rows, int64_t vocab, const int64_t* tgt, int64_t ignore_index, double inv_temp,
              const scalar_t* lse, const scalar_t* ent, const scalar_t* g_logp, const scalar_t* g_ent,
              const scalar_t* g_lse) {
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
      const double l = double(lse[r]);
      const double h = g_ent ? double(ent[r]) : 0.0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double zz = double(row[v]) * inv_temp;
        const double p = std::exp(zz - l);
        double dz = (gs - gl) * p;
        if (g_ent) dz -= ge * p * (zz - l + h);
        row[v] = scalar_t(dz * inv_temp);
      }
      row[y] += scalar_t(gl * inv_temp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_bwd_cpu(
    const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    int64_t ignore_index, bool needs_hidden_grad, bool needs_weight_grad, int64_t chunk_rows) {
  check_inputs(hidden, weight, targets);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc = acc_type(hidden);
  auto as_acc = [&](const c10::optional<at::Tensor>& g, const char* name) -> at::Tensor {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK(g->dim() == 1 && g->size(0) == n, name, " must have shape [", n, "], got ", g->sizes());
    return g->to(acc).contiguous();
  };
  const at::Tensor gl = as_acc(grad_logp, "grad_logp"), ge = as_acc(grad_entropy, "grad_entropy"),
                   gs = as_acc(grad_lse, "grad_lse");
  TORCH_CHECK(!ge.defined() || entropy.size(0) == n, "entropy from the forward is needed for grad_entropy");
  const at::Tensor tgt = targets.contiguous(), lse_c = lse.to(acc).contiguous();
  const at::Tensor ent_c = ge.defined() ? entropy.to(acc).contiguous() : at::Tensor();
  return chunked_linear_backward(hidden, weight, needs_hidden_grad, needs_weight_grad, chunk_rows,
                                 [&](at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_bwd_cpu", [&] {
      auto ptr = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() + start : nullptr; };
      bwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, tgt.data_ptr<int64_t>() + start, ignore_index,
                         1.0 / temperature, lse_c.data_ptr<scalar_t>() + start, ptr(ent_c), ptr(gl), ptr(ge), ptr(gs));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  m.def(
      "linear_logprob_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature, int ignore_index, "
      "bool return_entropy, int chunk_rows) -> (Tensor logp, Tensor entropy, Tensor lse)");
  m.def(
      "linear_logprob_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor? grad_lse, Tensor hidden, Tensor weight, "
      "Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, bool needs_hidden_grad, "
      "bool needs_weight_grad, int chunk_rows) -> (Tensor d_hidden, Tensor d_weight)");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) {
  m.impl("linear_logprob_fwd", &linear_logprob_fwd_cpu);
  m.impl("linear_logprob_bwd", &linear_logprob_bwd_cpu);
}

}  // namespace credit

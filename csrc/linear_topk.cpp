// CPU logit-level ops over a large vocabulary (credit_kernels/linear_topk.py, linear_gather.py):
//   linear_topk_fwd    the k largest logits of softmax(h W^T / T) per row (ties: smaller id first) + lse
//   linear_gather_fwd  log-probs at given ids + the tail log(1 - sum p over the distinct ids)
//   linear_logits_bwd  the shared backward: dz from per-row coefficients, overwritten at the ids
//
// Row chunks keep memory at chunk x V: each chunk's logits come from one MKL/oneDNN matmul, then one
// multi-threaded pass per row. Sums are in double; the ranking compares the tempered logit in the
// accumulation dtype (fp32 for bf16/fp16/fp32 inputs, like the Triton kernel), then the id. The forwards
// return each row's max and log_norm = log sum exp(z - max) apart and the backward uses them (the precision
// contract of linear_common.h). Python twins: credit_kernels/reference.py (linear_topk_fwd_ref,
// linear_gather_fwd_ref, linear_logits_bwd_ref).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_common.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace credit {
namespace {

void check_ids(const char* op, const at::Tensor& ids, int64_t n) {
  CHECK_CPU(op, ids);
  CHECK_DIM(op, ids, 2);
  TORCH_CHECK(ids.size(0) == n, op, ": ids must have shape [N, k] with N = ", n, "; got ", ids.sizes());
  CHECK_INT64(op, ids);
}

// The three row statistics of the forwards: (m, log_norm, m + log_norm), written in the accumulation dtype.
template <typename scalar_t>
void write_row_stats(double m, double log_s, int64_t r, scalar_t* lse, scalar_t* row_max, scalar_t* log_norm) {
  row_max[r] = scalar_t(m);  // exact: m is one of the accumulation-dtype logits
  log_norm[r] = scalar_t(log_s);
  lse[r] = scalar_t(m + log_s);
}

// ---------------------------------------------------------------------------------------------
// top-k
// ---------------------------------------------------------------------------------------------

// (value, id) ranks above another when its value is larger, or equal with the smaller id.
// -0.0 == +0.0 under operator==, so the two zeros rank by id, as in the kernel.
template <typename scalar_t>
struct Better {
  bool operator()(const std::pair<scalar_t, int64_t>& a, const std::pair<scalar_t, int64_t>& b) const {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};

template <typename scalar_t>
void topk_rows(const scalar_t* z, int64_t rows, int64_t vocab, int64_t k, scalar_t inv_temp, int64_t* ids,
               scalar_t* logp, scalar_t* lse, scalar_t* row_max, scalar_t* log_norm) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    using Item = std::pair<scalar_t, int64_t>;
    Better<scalar_t> better;
    std::vector<Item> heap;  // a min-heap under `better`: heap.front() is the worst of the k kept
    heap.reserve(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = z + r * vocab;
      heap.clear();
      for (int64_t v = 0; v < vocab; ++v) {
        scalar_t val = tempered(row[v], inv_temp);
        if (std::isnan(val)) val = -INFINITY;  // keeps the order strict-weak; the row's NaN lse reports it
        const Item item{val, v};
        if (int64_t(heap.size()) < k) {
          heap.push_back(item);
          std::push_heap(heap.begin(), heap.end(), better);
        } else if (better(item, heap.front())) {  // most entries stop at this one compare
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = item;
          std::push_heap(heap.begin(), heap.end(), better);
        }
      }
      std::sort(heap.begin(), heap.end(), better);
      double m, s;
      row_stats(row, vocab, inv_temp, m, s);
      const double log_s = std::log(s);
      write_row_stats(m, log_s, r, lse, row_max, log_norm);
      for (int64_t j = 0; j < k; ++j) {
        ids[r * k + j] = heap[j].second;
        logp[r * k + j] = scalar_t((double(heap[j].first) - m) - log_s);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_topk_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, int64_t k, double temperature, int64_t chunk_rows) {
  constexpr const char* op = "linear_topk_fwd";
  check_matrices(op, hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= vocab, op, ": k must lie in [1, V=", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const auto opts = hidden.options().dtype(acc_type(hidden));
  at::Tensor ids = at::empty({n, k}, hidden.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n, k}, opts), lse = at::empty({n}, opts);
  at::Tensor row_max = at::empty({n}, opts), log_norm = at::empty({n}, opts);
  chunked_linear_forward(hidden, weight, chunk_rows, [&](const at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_topk_fwd_cpu", [&] {
      topk_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, scalar_t(1.0 / temperature),
                          ids.data_ptr<int64_t>() + start * k, logp.data_ptr<scalar_t>() + start * k,
                          lse.data_ptr<scalar_t>() + start, row_max.data_ptr<scalar_t>() + start,
                          log_norm.data_ptr<scalar_t>() + start);
    });
  });
  return {ids, logp, lse, row_max, log_norm};
}

// ---------------------------------------------------------------------------------------------
// gather + tail
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void gather_rows(const scalar_t* z, int64_t rows, int64_t vocab, int64_t k, const int64_t* ids, scalar_t inv_temp,
                 bool want_tail, scalar_t* logp, scalar_t* tail, scalar_t* lse, scalar_t* row_max,
                 scalar_t* log_norm) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> sorted(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = z + r * vocab;
      const int64_t* rid = ids + r * k;
      double row_m, s;
      row_stats(row, vocab, inv_temp, row_m, s);
      const double log_s = std::log(s);
      write_row_stats(row_m, log_s, r, lse, row_max, log_norm);
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(rid[j] >= 0 && rid[j] < vocab, "linear_gather_fwd: ids[", r, ", ", j, "] = ", rid[j],
                    " is outside [0, ", vocab, ")");
        logp[r * k + j] = scalar_t((double(tempered(row[rid[j]], inv_temp)) - row_m) - log_s);
      }
      if (!want_tail) continue;
      // logsumexp over the ids NOT in the row: walk the sorted ids alongside v (duplicates count once)
      std::copy(rid, rid + k, sorted.begin());
      std::sort(sorted.begin(), sorted.end());
      double m = -INFINITY;
      int64_t p = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        if (p < k && sorted[p] == v) {
          while (p < k && sorted[p] == v) ++p;
          continue;
        }
        m = std::max(m, double(tempered(row[v], inv_temp)));
      }
      if (m == -INFINITY) {  // the ids cover the vocabulary: the tail is empty
        tail[r] = scalar_t(-INFINITY);
        continue;
      }
      double rest = 0.0;
      p = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        if (p < k && sorted[p] == v) {
          while (p < k && sorted[p] == v) ++p;
          continue;
        }
        rest += std::exp(double(tempered(row[v], inv_temp)) - m);
      }
      tail[r] = scalar_t(((m - row_m) + std::log(rest)) - log_s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_gather_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids, double temperature, bool tail,
    int64_t chunk_rows) {
  constexpr const char* op = "linear_gather_fwd";
  check_matrices(op, hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_ids(op, ids, n);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const int64_t k = ids.size(1);
  const auto opts = hidden.options().dtype(acc_type(hidden));
  at::Tensor logp = at::empty({n, k}, opts), lse = at::empty({n}, opts);
  at::Tensor row_max = at::empty({n}, opts), log_norm = at::empty({n}, opts);
  at::Tensor tail_out = at::empty({tail ? n : 0}, opts);
  const at::Tensor ids_c = ids.contiguous();
  chunked_linear_forward(hidden, weight, chunk_rows, [&](const at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_gather_fwd_cpu", [&] {
      gather_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, ids_c.data_ptr<int64_t>() + start * k,
                            scalar_t(1.0 / temperature), tail, logp.data_ptr<scalar_t>() + start * k,
                            tail ? tail_out.data_ptr<scalar_t>() + start : nullptr, lse.data_ptr<scalar_t>() + start,
                            row_max.data_ptr<scalar_t>() + start, log_norm.data_ptr<scalar_t>() + start);
    });
  });
  return {logp, tail_out, lse, row_max, log_norm};
}

// ---------------------------------------------------------------------------------------------
// shared backward
// ---------------------------------------------------------------------------------------------

// In place: z (raw h W^T) becomes dz for one chunk, with zt the tempered logit and s = zt - row_max:
//   dz = (coef exp(s - log_norm) + coef_rest exp(min(s - rest_shift, 0))) / T, then dz[ids[j]] = fix[j] / T.
template <typename scalar_t>
void bwd_rows(scalar_t* z, int64_t rows, int64_t vocab, int64_t k, const int64_t* ids, const scalar_t* fix,
              scalar_t inv_temp, const scalar_t* row_max, const scalar_t* log_norm, const scalar_t* coef,
              const scalar_t* rest_shift, const scalar_t* coef_rest) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const double it = double(inv_temp);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = z + r * vocab;
      const double m = double(row_max[r]), ln = double(log_norm[r]), c = double(coef[r]);
      const double rs = rest_shift ? double(rest_shift[r]) : 0.0, cr = rest_shift ? double(coef_rest[r]) : 0.0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double s = double(tempered(row[v], inv_temp)) - m;
        double dz = c * std::exp(s - ln);
        if (rest_shift) dz += cr * std::exp(std::min(s - rs, 0.0));
        row[v] = scalar_t(dz * it);
      }
      for (int64_t j = 0; j < k; ++j) row[ids[r * k + j]] = scalar_t(double(fix[r * k + j]) * it);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_logits_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& fix,
    const at::Tensor& row_max, const at::Tensor& log_norm, const at::Tensor& coef,
    const c10::optional<at::Tensor>& rest_shift, const c10::optional<at::Tensor>& coef_rest, double temperature,
    bool needs_hidden_grad, bool needs_weight_grad, int64_t chunk_rows) {
  constexpr const char* op = "linear_logits_bwd";
  check_matrices(op, hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_ids(op, ids, n);
  const int64_t k = ids.size(1);
  CHECK_SHAPE(op, fix, n, k);
  CHECK_SHAPE(op, row_max, n);
  CHECK_SHAPE(op, log_norm, n);
  CHECK_SHAPE(op, coef, n);
  const bool has_rest = rest_shift.has_value() && rest_shift->defined();
  TORCH_CHECK(has_rest == (coef_rest.has_value() && coef_rest->defined()), op,
              ": rest_shift and coef_rest must be given together");
  const auto acc = acc_type(hidden);
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor ids_c = ids.contiguous(), fix_c = as_acc(fix), max_c = as_acc(row_max), norm_c = as_acc(log_norm),
                   coef_c = as_acc(coef);
  at::Tensor rs_c, cr_c;
  if (has_rest) {
    CHECK_SHAPE(op, *rest_shift, n);
    CHECK_SHAPE(op, *coef_rest, n);
    rs_c = as_acc(*rest_shift);
    cr_c = as_acc(*coef_rest);
  }
  return chunked_linear_backward(hidden, weight, needs_hidden_grad, needs_weight_grad, chunk_rows,
                                 [&](at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logits_bwd_cpu", [&] {
      auto rowp = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() + start : nullptr; };
      bwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, ids_c.data_ptr<int64_t>() + start * k,
                         fix_c.data_ptr<scalar_t>() + start * k, scalar_t(1.0 / temperature), rowp(max_c),
                         rowp(norm_c), rowp(coef_c), rowp(rs_c), rowp(cr_c));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  m.def("linear_topk_fwd(Tensor hidden, Tensor weight, int k, float temperature, int chunk_rows) "
        "-> (Tensor ids, Tensor logp, Tensor lse, Tensor row_max, Tensor log_norm)");
  m.def("linear_gather_fwd(Tensor hidden, Tensor weight, Tensor ids, float temperature, bool tail, int chunk_rows) "
        "-> (Tensor logp, Tensor tail, Tensor lse, Tensor row_max, Tensor log_norm)");
  m.def("linear_logits_bwd(Tensor hidden, Tensor weight, Tensor ids, Tensor fix, Tensor row_max, Tensor log_norm, "
        "Tensor coef, Tensor? rest_shift, Tensor? coef_rest, float temperature, bool needs_hidden_grad, "
        "bool needs_weight_grad, int chunk_rows) -> (Tensor d_hidden, Tensor d_weight)");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) {
  m.impl("linear_topk_fwd", &linear_topk_fwd_cpu);
  m.impl("linear_gather_fwd", &linear_gather_fwd_cpu);
  m.impl("linear_logits_bwd", &linear_logits_bwd_cpu);
}

}  // namespace credit

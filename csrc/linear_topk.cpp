// CPU logit-level ops over a large vocabulary (credit_kernels/linear_topk.py, linear_gather.py):
//   linear_topk_fwd    the k largest logits of softmax(h W^T / T) per row (ties: smaller id first) + lse
//   linear_gather_fwd  log-probs at given ids + the tail log(1 - sum p over the distinct ids)
//   linear_logits_bwd  the shared backward: dz from per-row coefficients, overwritten at the ids
//
// Row chunks keep memory at chunk x V: each chunk's logits come from one MKL/oneDNN matmul, then one
// multi-threaded pass per row. Sums are in double; the ranking compares the tempered logit in the
// accumulation dtype (fp32 for bf16/fp16/fp32 inputs, like the Triton kernel), then the id.
// Python twins: credit_kernels/reference.py (linear_topk_ref, linear_gather_ref) and
// credit_kernels/linear_topk.py (_linear_logits_bwd_torch).
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

#define CHECK_SHAPE(x, ...) \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ "), got ", (x).sizes())

void check_ids(const at::Tensor& ids, int64_t n) {
  CHECK_CPU(ids);
  CHECK_DIM(ids, 2);
  TORCH_CHECK(ids.size(0) == n, "ids must have shape [N, k] with N = ", n, "; got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
}

// max and log-sum-exp of a row of tempered logits, in double.
template <typename scalar_t>
double row_lse(const scalar_t* row, int64_t vocab, scalar_t inv_temp) {
  double m = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, double(scalar_t(row[v] * inv_temp)));
  double s = 0.0;
  for (int64_t v = 0; v < vocab; ++v) s += std::exp(double(scalar_t(row[v] * inv_temp)) - m);
  return m + std::log(s);
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
               scalar_t* logp, scalar_t* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    using Item = std::pair<scalar_t, int64_t>;
    Better<scalar_t> better;
    std::vector<Item> heap;  // a min-heap under `better`: heap.front() is the worst of the k kept
    heap.reserve(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = z + r * vocab;
      heap.clear();
      for (int64_t v = 0; v < vocab; ++v) {
        scalar_t val = scalar_t(row[v] * inv_temp);
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
      const double l = row_lse(row, vocab, inv_temp);
      lse[r] = scalar_t(l);
      for (int64_t j = 0; j < k; ++j) {
        ids[r * k + j] = heap[j].second;
        logp[r * k + j] = scalar_t(double(heap[j].first) - l);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_topk_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                    int64_t k, double temperature, int64_t chunk_rows) {
  check_matrices(hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= vocab, "k must lie in [1, V=", vocab, "], got ", k);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor ids = at::empty({n, k}, hidden.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n, k}, opts), lse = at::empty({n}, opts);
  if (n == 0) return {ids, logp, lse};
  const at::Tensor w = weight.to(acc).contiguous();
  const int64_t step = pick_chunk(chunk_rows, vocab);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor z = at::mm(hidden.narrow(0, start, rows).to(acc), w.t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_topk_fwd_cpu", [&] {
      topk_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, scalar_t(1.0 / temperature),
                          ids.data_ptr<int64_t>() + start * k, logp.data_ptr<scalar_t>() + start * k,
                          lse.data_ptr<scalar_t>() + start);
    });
  }
  return {ids, logp, lse};
}

// ---------------------------------------------------------------------------------------------
// gather + tail
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void gather_rows(const scalar_t* z, int64_t rows, int64_t vocab, int64_t k, const int64_t* ids, scalar_t inv_temp,
                 bool want_tail, scalar_t* logp, scalar_t* tail, scalar_t* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> sorted(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = z + r * vocab;
      const int64_t* rid = ids + r * k;
      const double l = row_lse(row, vocab, inv_temp);
      lse[r] = scalar_t(l);
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(rid[j] >= 0 && rid[j] < vocab, "ids[", r, ", ", j, "] = ", rid[j], " is outside [0, ", vocab, ")");
        logp[r * k + j] = scalar_t(double(scalar_t(row[rid[j]] * inv_temp)) - l);
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
        m = std::max(m, double(scalar_t(row[v] * inv_temp)));
      }
      if (m == -INFINITY) {  // the ids cover the vocabulary: the tail is empty
        tail[r] = scalar_t(-INFINITY);
        continue;
      }
      double s = 0.0;
      p = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        if (p < k && sorted[p] == v) {
          while (p < k && sorted[p] == v) ++p;
          continue;
        }
        s += std::exp(double(scalar_t(row[v] * inv_temp)) - m);
      }
      tail[r] = scalar_t(m + std::log(s) - l);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gather_fwd_cpu(const at::Tensor& hidden,
                                                                      const at::Tensor& weight, const at::Tensor& ids,
                                                                      double temperature, bool tail,
                                                                      int64_t chunk_rows) {
  check_matrices(hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_ids(ids, n);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const int64_t k = ids.size(1);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n, k}, opts), lse = at::empty({n}, opts);
  at::Tensor tail_out = at::empty({tail ? n : 0}, opts);
  if (n == 0) return {logp, tail_out, lse};
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor ids_c = ids.contiguous();
  const int64_t step = pick_chunk(chunk_rows, vocab);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t rows = std::min(step, n - start);
    const at::Tensor z = at::mm(hidden.narrow(0, start, rows).to(acc), w.t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_gather_fwd_cpu", [&] {
      gather_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, ids_c.data_ptr<int64_t>() + start * k,
                            scalar_t(1.0 / temperature), tail, logp.data_ptr<scalar_t>() + start * k,
                            tail ? tail_out.data_ptr<scalar_t>() + start : nullptr, lse.data_ptr<scalar_t>() + start);
    });
  }
  return {logp, tail_out, lse};
}

// ---------------------------------------------------------------------------------------------
// shared backward
// ---------------------------------------------------------------------------------------------

// In place: z (raw h W^T) becomes dz for one chunk:
//   dz = (coef p + coef_rest exp(min(z - lse_rest, 0))) / T, then dz[ids[j]] = fix[j] / T.
template <typename scalar_t>
void bwd_rows(scalar_t* z, int64_t rows, int64_t vocab, int64_t k, const int64_t* ids, const scalar_t* fix,
              double inv_temp, const scalar_t* lse, const scalar_t* coef, const scalar_t* lse_rest,
              const scalar_t* coef_rest) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = z + r * vocab;
      const double l = double(lse[r]), c = double(coef[r]);
      const double lr = lse_rest ? double(lse_rest[r]) : 0.0, cr = lse_rest ? double(coef_rest[r]) : 0.0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double zz = double(row[v]) * inv_temp;
        double dz = c * std::exp(zz - l);
        if (lse_rest) dz += cr * std::exp(std::min(zz - lr, 0.0));
        row[v] = scalar_t(dz * inv_temp);
      }
      for (int64_t j = 0; j < k; ++j) row[ids[r * k + j]] = scalar_t(double(fix[r * k + j]) * inv_temp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_logits_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& fix,
    const at::Tensor& lse, const at::Tensor& coef, const c10::optional<at::Tensor>& lse_rest,
    const c10::optional<at::Tensor>& coef_rest, double temperature, bool needs_hidden_grad, bool needs_weight_grad,
    int64_t chunk_rows) {
  check_matrices(hidden, weight);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_ids(ids, n);
  const int64_t k = ids.size(1);
  CHECK_SHAPE(fix, n, k);
  CHECK_SHAPE(lse, n);
  CHECK_SHAPE(coef, n);
  const bool has_rest = lse_rest.has_value() && lse_rest->defined();
  TORCH_CHECK(has_rest == (coef_rest.has_value() && coef_rest->defined()),
              "lse_rest and coef_rest must be given together");
  const auto acc = acc_type(hidden);
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor ids_c = ids.contiguous(), fix_c = as_acc(fix), lse_c = as_acc(lse), coef_c = as_acc(coef);
  at::Tensor lr_c, cr_c;
  if (has_rest) {
    CHECK_SHAPE(*lse_rest, n);
    CHECK_SHAPE(*coef_rest, n);
    lr_c = as_acc(*lse_rest);
    cr_c = as_acc(*coef_rest);
  }
  return chunked_linear_backward(hidden, weight, needs_hidden_grad, needs_weight_grad, chunk_rows,
                                 [&](at::Tensor& z, int64_t start, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logits_bwd_cpu", [&] {
      auto rowp = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() + start : nullptr; };
      bwd_rows<scalar_t>(z.data_ptr<scalar_t>(), rows, vocab, k, ids_c.data_ptr<int64_t>() + start * k,
                         fix_c.data_ptr<scalar_t>() + start * k, 1.0 / temperature, rowp(lse_c), rowp(coef_c),
                         rowp(lr_c), rowp(cr_c));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  m.def("linear_topk_fwd(Tensor hidden, Tensor weight, int k, float temperature, int chunk_rows) "
        "-> (Tensor ids, Tensor logp, Tensor lse)");
  m.def("linear_gather_fwd(Tensor hidden, Tensor weight, Tensor ids, float temperature, bool tail, int chunk_rows) "
        "-> (Tensor logp, Tensor tail, Tensor lse)");
  m.def("linear_logits_bwd(Tensor hidden, Tensor weight, Tensor ids, Tensor fix, Tensor lse, Tensor coef, "
        "Tensor? lse_rest, Tensor? coef_rest, float temperature, bool needs_hidden_grad, bool needs_weight_grad, "
        "int chunk_rows) -> (Tensor d_hidden, Tensor d_weight)");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) {
  m.impl("linear_topk_fwd", &linear_topk_fwd_cpu);
  m.impl("linear_gather_fwd", &linear_gather_fwd_cpu);
  m.impl("linear_logits_bwd", &linear_logits_bwd_cpu);
}

}  // namespace credit

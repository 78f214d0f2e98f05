// CREDIT token rewards and per-response pMI diagnostics in one pass over a, b[M], s, mask (CPU).
//
//   beta = mean_m b^m ("mean": sum_m b / M) or logsumexp_m b^m - log M ("logmeanexp")
//   r    = (a - s) - lam * (beta - s), exactly +0.0 where mask == 0            [B, T] fp32
//   pmi  = sum_t m (a - s);  surrogate = sum_t m (a - mean_m b)                [B] fp32
//   contrastive = A - (logsumexp_m B_m - log M),  A = sum_t m a,  B_m = sum_t m b^m
//
// The Python oracle is credit/rewards.py (credit_rewards + sequence_pmi); its module docstring fixes the
// conventions this kernel follows: fp32 math on fp32-cast inputs, masking by selection (never by multiplying,
// so NaN/inf at masked positions cannot leak), beta and the reward evaluated in the oracle's operation order,
// logsumexp as torch computes it (max, with +-inf replaced by 0, then log(sum exp(x - max)) + max). Per-token
// values therefore match the oracle up to expf/logf rounding and the order of the partner sum (bit for bit with
// "mean" and M <= 2, where that sum has a single rounding). Row sums add the same fp32 terms in 16 fp32 lanes per
// 256-token chunk, lanes and chunks in double: more accurate than the oracle's fp32 sums, equal to them up to
// their rounding.
//
// Schedule: rows in parallel; each row walks T in chunks of kChunk tokens. A chunk's inputs are converted to
// contiguous fp32 buffers in L1, then the M partner rows are swept once (sum, max, masked row sums), so every
// input element is read from memory once ("logmeanexp" re-reads the chunk's partner values, from L1/L2, for its
// exp pass). All loops are branch-free elementwise loops over floats, auto-vectorised at -O3.
// The CUDA twin is csrc/cuda/credit_reward.cu; the dispatcher is credit_kernels/credit_reward.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "credit_reward_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace credit {
namespace {

constexpr int64_t kChunk = 256;  // tokens per chunk; the per-thread buffers below (~9 KiB) stay in L1
constexpr int kLanes = 16;       // independent fp32 partial sums: vectorisable without reassociating anything

template <typename scalar_t>
struct RowArgs {
  const scalar_t* a;
  const scalar_t* sh;
  const scalar_t* s;
  const bool* keep;
  int64_t a_b, a_t, sh_m, sh_b, sh_t, s_b, s_t, k_b, k_t;  // strides (elements)
  float* r;                                                 // [B, T] contiguous
  float* pmi;
  float* contrastive;
  float* surrogate;
  int64_t T, M;
  float lam, log_m;
};

// One thread's chunk buffers: the strided inputs are converted to contiguous fp32 once, so that every later loop
// is a plain elementwise loop over floats (auto-vectorised at -O3, no fast-math needed).
struct Scratch {
  alignas(64) float a[kChunk], s[kChunk], b[kChunk], bsum[kChunk], bmax[kChunk], esum[kChunk], w[kChunk],
      w2[kChunk], w3[kChunk];
  alignas(64) uint32_t keep[kChunk];  // all ones where the mask keeps the token, else 0
};

// x where keep is all ones, +0.0 where it is 0: a selection (NaN/inf in x never leak), done on the bits because
// GCC will not if-convert a float `keep ? x : 0.0f` under the default -ftrapping-math, and the loops would not
// vectorise.
inline float keep_or_zero(float x, uint32_t keep) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= keep;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

// torch.logsumexp's shift: the max, except that +-inf becomes 0 so inf - inf never happens.
inline float lse_shift(float mx) { return std::isinf(mx) ? 0.0f : mx; }

// sum of w[0..n) in kLanes fp32 lanes (each adds <= kChunk / kLanes terms), the lanes added in double.
inline double lane_sum(const float* w, int64_t n) {
  float lanes[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += w[t + j];
  for (int j = 0; t < n; ++t, ++j) lanes[j] += w[t];
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

template <typename scalar_t>
inline float to_float(scalar_t x) {
  return static_cast<float>(x);
}

// bf16 -> fp32 is a 16-bit shift; spelled out, it vectorises (c10's conversion goes through memcpy calls).
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The unit-stride case gets its own loop so that it vectorises; other strides gather.
template <typename scalar_t>
inline void load_row(float* dst, const scalar_t* src, int64_t stride, int64_t n) {
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = to_float(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = to_float(src[t * stride]);
  }
}

inline void load_keep(uint32_t* dst, const bool* src, int64_t stride, int64_t n) {
  // read the bytes: any non-zero byte keeps, whatever a bool tensor happens to hold
  const auto* bytes = reinterpret_cast<const uint8_t*>(src);
  if (stride == 1) {
    for (int64_t t = 0; t < n; ++t) dst[t] = bytes[t] != 0 ? ~0u : 0u;
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = bytes[t * stride] != 0 ? ~0u : 0u;
  }
}

template <typename scalar_t, bool LOGMEANEXP>
void credit_reward_row(const RowArgs<scalar_t>& p, int64_t i, Scratch& sc, std::vector<double>& part) {
  const int64_t T = p.T, M = p.M;
  const float count = static_cast<float>(M);  // divide (not multiply by 1/M): the oracle divides
  std::fill(part.begin(), part.end(), 0.0);   // B_m, double
  double pmi = 0.0, a_sum = 0.0, sur = 0.0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    load_keep(sc.keep, p.keep + i * p.k_b + t0 * p.k_t, p.k_t, n);
    load_row(sc.a, p.a + i * p.a_b + t0 * p.a_t, p.a_t, n);
    load_row(sc.s, p.s + i * p.s_b + t0 * p.s_t, p.s_t, n);
    std::fill(sc.bsum, sc.bsum + n, 0.0f);
    std::fill(sc.bmax, sc.bmax + n, -std::numeric_limits<float>::infinity());
    // 1. one sweep over the partners: the token-wise sum (a left fold from 0, like torch's b.sum(0) for small M)
    //    and max, and each partner's masked row sum B_m. Masked tokens are selected out (never multiplied by 0),
    //    so NaN/inf there cannot leak.
    for (int64_t m = 0; m < M; ++m) {
      load_row(sc.b, p.sh + m * p.sh_m + i * p.sh_b + t0 * p.sh_t, p.sh_t, n);
      for (int64_t t = 0; t < n; ++t) {
        const float v = sc.b[t];
        sc.bsum[t] += v;
        if (LOGMEANEXP) sc.bmax[t] = v > sc.bmax[t] ? v : sc.bmax[t];  // a NaN b makes e, hence beta, NaN anyway
        sc.w[t] = keep_or_zero(v, sc.keep[t]);
      }
      part[m] += lane_sum(sc.w, n);
    }
    // 2. "logmeanexp" only: sum_m exp(b - shift), a second sweep over the chunk's partner values (now in cache).
    if (LOGMEANEXP) {
      for (int64_t t = 0; t < n; ++t) {
        sc.bmax[t] = lse_shift(sc.bmax[t]);
        sc.esum[t] = 0.0f;
      }
      for (int64_t m = 0; m < M; ++m) {
        load_row(sc.b, p.sh + m * p.sh_m + i * p.sh_b + t0 * p.sh_t, p.sh_t, n);
        for (int64_t t = 0; t < n; ++t) sc.esum[t] += std::exp(sc.b[t] - sc.bmax[t]);
      }
      for (int64_t t = 0; t < n; ++t) sc.esum[t] = (std::log(sc.esum[t]) + sc.bmax[t]) - p.log_m;  // beta
    }
    // 3. r = (a - s) - lam * (beta - s), +0.0 where masked (by selection); the row terms.
    float* r = p.r + i * T + t0;
    for (int64_t t = 0; t < n; ++t) {
      const float av = sc.a[t], sv = sc.s[t];
      const float mean = sc.bsum[t] / count;
      const float beta = LOGMEANEXP ? sc.esum[t] : mean;
      const float sd = av - sv;
      const uint32_t kt = sc.keep[t];
      r[t] = keep_or_zero(sd - p.lam * (beta - sv), kt);
      sc.w[t] = keep_or_zero(sd, kt);
      sc.w2[t] = keep_or_zero(av, kt);
      sc.w3[t] = keep_or_zero(av - mean, kt);
    }
    pmi += lane_sum(sc.w, n);
    a_sum += lane_sum(sc.w2, n);
    sur += lane_sum(sc.w3, n);
  }
  // 4. contrastive pMI: the oracle's fp32 logsumexp over the M row sums (rounded to fp32 first, as the oracle's).
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t m = 0; m < M; ++m) mx = std::max(mx, static_cast<float>(part[m]));
  const float shift = lse_shift(mx);
  float e = 0.0f;
  for (int64_t m = 0; m < M; ++m) e += std::exp(static_cast<float>(part[m]) - shift);
  const float lse = std::log(e) + shift;
  p.pmi[i] = static_cast<float>(pmi);
  p.contrastive[i] = static_cast<float>(a_sum) - (lse - p.log_m);
  p.surrogate[i] = static_cast<float>(sur);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> credit_reward_cpu(const at::Tensor& aligned,
                                                                             const at::Tensor& shuffled,
                                                                             const at::Tensor& student,
                                                                             const at::Tensor& mask, double lam,
                                                                             c10::string_view baseline) {
  const CreditRewardShape shape = check_credit_reward_args(aligned, shuffled, student, mask, lam, baseline,
                                                           c10::DeviceType::CPU, std::numeric_limits<int64_t>::max());
  const int64_t B = shape.B, T = shape.T, M = shape.M;

  const auto f32 = aligned.options().dtype(at::kFloat);
  at::Tensor rewards = at::empty({B, T}, f32);
  at::Tensor pmi = at::empty({B}, f32), contrastive = at::empty({B}, f32), surrogate = at::empty({B}, f32);
  if (B == 0) return {rewards, pmi, contrastive, surrogate};
  // Any non-zero mask entry counts as 1 (a bool copy of a B x T mask is cheap next to the M x B x T read).
  const at::Tensor keep = mask.scalar_type() == at::kBool ? mask : mask.ne(0);

  const bool logmeanexp = baseline == "logmeanexp";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, aligned.scalar_type(), "credit_reward_cpu", [&] {
    const RowArgs<scalar_t> p{aligned.const_data_ptr<scalar_t>(), shuffled.const_data_ptr<scalar_t>(),
                              student.const_data_ptr<scalar_t>(), keep.const_data_ptr<bool>(),
                              aligned.stride(0), aligned.stride(1), shuffled.stride(0), shuffled.stride(1),
                              shuffled.stride(2), student.stride(0), student.stride(1), keep.stride(0),
                              keep.stride(1), rewards.data_ptr<float>(), pmi.data_ptr<float>(),
                              contrastive.data_ptr<float>(), surrogate.data_ptr<float>(), T, M,
                              // fp32 constants, as torch uses a Python float scalar in fp32 arithmetic
                              static_cast<float>(lam), static_cast<float>(std::log(static_cast<double>(M)))};
    // A row costs (M + 3) T element reads; aim for >= 32k elements per task.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, (M + 3) * T));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      auto sc = std::make_unique<Scratch>();
      std::vector<double> part(M);
      for (int64_t i = begin; i < end; ++i) {
        if (logmeanexp) {
          credit_reward_row<scalar_t, true>(p, i, *sc, part);
        } else {
          credit_reward_row<scalar_t, false>(p, i, *sc, part);
        }
      }
    });
  });
  return {rewards, pmi, contrastive, surrogate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(credit_C, m) {
  // The dispatcher (credit_kernels/credit_reward.py) validates, casts mixed dtypes to fp32 and scans for NaN;
  // the CPU kernel is here, the CUDA one in csrc/cuda/credit_reward_cuda.cpp.
  m.def(
      "credit_reward(Tensor aligned, Tensor shuffled, Tensor student, Tensor mask, float lam, str baseline) -> "
      "(Tensor rewards, Tensor pmi, Tensor contrastive_pmi, Tensor contrastive_pmi_surrogate)");
}

TORCH_LIBRARY_IMPL(credit_C, CPU, m) { m.impl("credit_reward", &credit_reward_cpu); }

}  // namespace credit

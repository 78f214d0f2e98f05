// CREDIT token rewards and per-response pMI diagnostics in one pass (CUDA).
//
//   beta = mean_m b^m ("mean": sum_m b / M) or logsumexp_m b^m - log M ("logmeanexp")
//   r    = (a - s) - lam * (beta - s), exactly +0.0 where mask == 0            [B, T] fp32
//   pmi  = sum_t m (a - s);  surrogate = sum_t m (a - mean_m b)                [B] fp32
//   contrastive = A - (logsumexp_m B_m - log M),  A = sum_t m a,  B_m = sum_t m b^m
//
// Same conventions as the CPU kernel (csrc/credit_reward.cpp) and the Python oracle (credit/rewards.py).
// This file includes CUDA headers only (no torch), so CI compile-checks it standalone; the ATen binding is
// csrc/cuda/credit_reward_cuda.cpp and calls the plain launcher at the bottom.
//
// Schedule: one block of kThreads per response row; the block walks T in tiles of kThreads tokens (one token
// per thread, coalesced when the T stride is 1). Per token, the thread sweeps the M partners once (sum, max,
// and the masked value that a warp shuffle-reduces into its warp's B_m accumulator in shared memory: each
// warp owns one row of it, so there are no atomics). The pmi / A / surrogate partials stay in registers.
// One final block reduction finishes the row, including the logsumexp over the M row sums.
//
// Precision: setup.py compiles .cu files with --use_fast_math, which turns `/`, expf and logf into
// approximations and lets nvcc contract a * b + c into an fma. The oracle's fp32 operation order is kept with
// explicit __f*_rn intrinsics (never contracted), and exp/log run in double (unaffected by fast-math) and are
// rounded to fp32. Row sums add the fp32 terms in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPartners = 64;  // the Python dispatcher rejects larger M with a ValueError
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// torch.amax propagates NaN; so does this.
__device__ __forceinline__ float nan_max(float x, float y) { return (isnan(y) || y > x) ? y : x; }

// torch.logsumexp's shift: the max, except that +-inf becomes 0 so that inf - inf never happens.
__device__ __forceinline__ float lse_shift(float mx) { return isinf(mx) ? 0.0f : mx; }

// exp and log, correctly rounded to fp32 whatever the fast-math flags.
__device__ __forceinline__ float exp_f32(float x) { return static_cast<float>(exp(static_cast<double>(x))); }
__device__ __forceinline__ float log_f32(float x) { return static_cast<float>(log(static_cast<double>(x))); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

struct Strides {
  int64_t a_b, a_t, sh_m, sh_b, sh_t, s_b, s_t, k_b, k_t;  // in elements
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    credit_reward_kernel(const T* __restrict__ aligned, const T* __restrict__ shuffled, const T* __restrict__ student,
                         const uint8_t* __restrict__ keep, float* __restrict__ rewards, float* __restrict__ pmi,
                         float* __restrict__ contrastive, float* __restrict__ surrogate, int64_t n_tokens,
                         int n_partners, float lam, float log_m, bool logmeanexp, Strides st) {
  __shared__ double warp_part[kWarps][kMaxPartners];  // B_m partials, one row per warp
  __shared__ double warp_rows[kWarps][3];             // pmi, A, surrogate partials per warp
  __shared__ float row_part[kMaxPartners];            // B_m of this row, fp32 as in the oracle

  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int m = lane; m < n_partners; m += 32) warp_part[warp][m] = 0.0;
  __syncwarp();  // lane 0 of this warp accumulates into the row the whole warp just zeroed

  const float count = static_cast<float>(n_partners);
  double my_pmi = 0.0, my_a = 0.0, my_sur = 0.0;
  // The trip count is uniform across the block: every lane joins the shuffles, in range or not.
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kThreads) {
    const int64_t t = t0 + threadIdx.x;
    const bool in = t < n_tokens;
    const bool k = in && keep[row * st.k_b + t * st.k_t] != 0;
    const T* b_ptr = shuffled + row * st.sh_b + t * st.sh_t;

    // 1. one sweep over the partners: token-wise sum (left fold from 0, as torch) and max; B_m partials.
    float bsum = 0.0f, bmax = -INFINITY;
    for (int m = 0; m < n_partners; ++m) {
      const float v = in ? to_float(b_ptr[m * st.sh_m]) : 0.0f;
      bsum = __fadd_rn(bsum, v);
      bmax = nan_max(bmax, v);
      const float part = warp_sum(k ? v : 0.0f);  // select, never multiply: NaN at masked tokens stays out
      if (lane == 0) warp_part[warp][m] += part;
    }
    if (!in) continue;

    // 2. beta, in the oracle's order: b.sum(0) / M, or (log(sum exp(b - shift)) + shift) - log M.
    const float beta_mean = __fdiv_rn(bsum, count);
    float beta = beta_mean;
    if (logmeanexp) {
      const float shift = lse_shift(bmax);
      float e = 0.0f;
      for (int m = 0; m < n_partners; ++m) e = __fadd_rn(e, exp_f32(__fsub_rn(to_float(b_ptr[m * st.sh_m]), shift)));
      beta = __fsub_rn(__fadd_rn(log_f32(e), shift), log_m);
    }

    // 3. r = (a - s) - lam * (beta - s), +0.0 at masked tokens.
    float r = 0.0f;
    if (k) {
      const float av = to_float(aligned[row * st.a_b + t * st.a_t]);
      const float sv = to_float(student[row * st.s_b + t * st.s_t]);
      const float sd = __fsub_rn(av, sv);
      r = __fsub_rn(sd, __fmul_rn(lam, __fsub_rn(beta, sv)));
      my_pmi += sd;
      my_a += av;
      my_sur += __fsub_rn(av, beta_mean);
    }
    rewards[row * n_tokens + t] = r;
  }

  // 4. block reduction of the row sums.
  my_pmi = warp_sum(my_pmi);
  my_a = warp_sum(my_a);
  my_sur = warp_sum(my_sur);
  if (lane == 0) {
    warp_rows[warp][0] = my_pmi;
    warp_rows[warp][1] = my_a;
    warp_rows[warp][2] = my_sur;
  }
  __syncthreads();
  for (int m = threadIdx.x; m < n_partners; m += kThreads) {
    double acc = 0.0;
    for (int w = 0; w < kWarps; ++w) acc += warp_part[w][m];
    row_part[m] = static_cast<float>(acc);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum_pmi = 0.0, sum_a = 0.0, sum_sur = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      sum_pmi += warp_rows[w][0];
      sum_a += warp_rows[w][1];
      sum_sur += warp_rows[w][2];
    }
    // 5. contrastive pMI = A - (logsumexp_m B_m - log M), the oracle's fp32 logsumexp.
    float mx = -INFINITY;
    for (int m = 0; m < n_partners; ++m) mx = nan_max(mx, row_part[m]);
    const float shift = lse_shift(mx);
    float e = 0.0f;
    for (int m = 0; m < n_partners; ++m) e = __fadd_rn(e, exp_f32(__fsub_rn(row_part[m], shift)));
    const float lse = __fadd_rn(log_f32(e), shift);
    pmi[row] = static_cast<float>(sum_pmi);
    contrastive[row] = __fsub_rn(static_cast<float>(sum_a), __fsub_rn(lse, log_m));
    surrogate[row] = static_cast<float>(sum_sur);
  }
}

template <typename T>
void launch(const void* aligned, const void* shuffled, const void* student, const uint8_t* keep, float* rewards,
            float* pmi, float* contrastive, float* surrogate, int64_t n_rows, int64_t n_tokens, int n_partners,
            float lam, float log_m, bool logmeanexp, const Strides& st, cudaStream_t stream) {
  credit_reward_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(aligned), static_cast<const T*>(shuffled), static_cast<const T*>(student), keep,
      rewards, pmi, contrastive, surrogate, n_tokens, n_partners, lam, log_m, logmeanexp, st);
}

}  // namespace

// Plain C launcher (declared again in credit_reward_cuda.cpp; keep the two signatures identical).
//   dtype: 0 = fp32, 1 = fp16, 2 = bf16 (aligned, shuffled and student share it); keep: [B, T] bytes, != 0 keeps;
//   rewards: [B, T] contiguous fp32; pmi, contrastive, surrogate: [B] fp32; strides (elements):
//   {a_b, a_t, sh_m, sh_b, sh_t, s_b, s_t, k_b, k_t}. Returns cudaErrorInvalidValue for bad sizes or dtype,
//   otherwise the launch status.
extern "C" cudaError_t credit_reward_cuda_launch(int dtype, const void* aligned, const void* shuffled,
                                                 const void* student, const uint8_t* keep, float* rewards, float* pmi,
                                                 float* contrastive, float* surrogate, int64_t n_rows,
                                                 int64_t n_tokens, int64_t n_partners, float lam, float log_m,
                                                 int logmeanexp, const int64_t* strides, cudaStream_t stream) {
  if (n_partners < 1 || n_partners > kMaxPartners || n_rows < 0 || n_rows > 0x7fffffffLL || n_tokens < 0) {
    return cudaErrorInvalidValue;
  }
  if (n_rows == 0) return cudaSuccess;
  const Strides st{strides[0], strides[1], strides[2], strides[3], strides[4],
                   strides[5], strides[6], strides[7], strides[8]};
  const int m = static_cast<int>(n_partners);
  const bool lme = logmeanexp != 0;
  switch (dtype) {
    case 0:
      launch<float>(aligned, shuffled, student, keep, rewards, pmi, contrastive, surrogate, n_rows, n_tokens, m, lam,
                    log_m, lme, st, stream);
      break;
    case 1:
      launch<__half>(aligned, shuffled, student, keep, rewards, pmi, contrastive, surrogate, n_rows, n_tokens, m,
                     lam, log_m, lme, st, stream);
      break;
    case 2:
      launch<__nv_bfloat16>(aligned, shuffled, student, keep, rewards, pmi, contrastive, surrogate, n_rows, n_tokens,
                            m, lam, log_m, lme, st, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ATen binding of the CUDA credit_reward kernel (csrc/cuda/credit_reward.cu): checks, the bool mask, outputs, and
// the launch on the current stream. The schema is declared with the CPU kernel in csrc/credit_reward.cpp; the
// dispatcher that validates inputs, casts mixed dtypes and scans for NaN is credit_kernels/credit_reward.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "credit_reward_args.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

// Defined in credit_reward.cu; keep the two signatures identical.
extern "C" cudaError_t credit_reward_cuda_launch(int dtype, const void* aligned, const void* shuffled,
                                                 const void* student, const uint8_t* keep, float* rewards, float* pmi,
                                                 float* contrastive, float* surrogate, int64_t n_rows,
                                                 int64_t n_tokens, int64_t n_partners, float lam, float log_m,
                                                 int logmeanexp, const int64_t* strides, cudaStream_t stream);

namespace credit {
namespace {

constexpr int64_t kMaxPartners = 64;  // kMaxPartners in credit_reward.cu

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, "credit_reward (CUDA): inputs must be fp32, fp16 or bf16, got ", t,
                  " (the Python wrapper casts other float dtypes to fp32)");
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> credit_reward_cuda(const at::Tensor& aligned,
                                                                              const at::Tensor& shuffled,
                                                                              const at::Tensor& student,
                                                                              const at::Tensor& mask, double lam,
                                                                              c10::string_view baseline) {
  const CreditRewardShape shape = check_credit_reward_args(aligned, shuffled, student, mask, lam, baseline,
                                                           c10::DeviceType::CUDA, kMaxPartners);
  const int64_t B = shape.B, T = shape.T, M = shape.M;
  const int code = dtype_code(aligned.scalar_type());
  TORCH_CHECK(B <= 0x7fffffffLL, "credit_reward (CUDA): at most 2^31 - 1 rows (one block per row), got B = ", B);

  const c10::cuda::CUDAGuard guard(aligned.device());
  const auto f32 = aligned.options().dtype(at::kFloat);
  at::Tensor rewards = at::empty({B, T}, f32);
  at::Tensor pmi = at::empty({B}, f32), contrastive = at::empty({B}, f32), surrogate = at::empty({B}, f32);
  if (B == 0) return {rewards, pmi, contrastive, surrogate};
  // Any non-zero mask entry counts as 1; a bool tensor is read as bytes (!= 0), whatever byte it holds.
  const at::Tensor keep = mask.scalar_type() == at::kBool ? mask : mask.ne(0);
  const int64_t strides[9] = {aligned.stride(0),  aligned.stride(1), shuffled.stride(0),
                              shuffled.stride(1), shuffled.stride(2), student.stride(0),
                              student.stride(1),  keep.stride(0),     keep.stride(1)};
  const cudaError_t err = credit_reward_cuda_launch(
      code, aligned.const_data_ptr(), shuffled.const_data_ptr(), student.const_data_ptr(),
      static_cast<const uint8_t*>(keep.const_data_ptr()), rewards.data_ptr<float>(), pmi.data_ptr<float>(),
      contrastive.data_ptr<float>(), surrogate.data_ptr<float>(), B, T, M, static_cast<float>(lam),
      static_cast<float>(std::log(static_cast<double>(M))), baseline == "logmeanexp" ? 1 : 0, strides,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "credit_reward (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {rewards, pmi, contrastive, surrogate};
}

}  // namespace

TORCH_LIBRARY_IMPL(credit_C, CUDA, m) { m.impl("credit_reward", &credit_reward_cuda); }

}  // namespace credit

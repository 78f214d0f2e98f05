// The argument checks of credit_reward, written once for both of its kernels: the CPU one (csrc/credit_reward.cpp)
// and the CUDA binding (csrc/cuda/credit_reward_cuda.cpp). The dispatcher (credit_kernels/credit_reward.py)
// validates first with Python errors; these guard the raw torch.ops.credit_C.credit_reward.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"

namespace credit {

struct CreditRewardShape {
  int64_t B, T, M;
};

// aligned, student, mask [B, T]; shuffled [M, B, T] with 1 <= M <= max_partners; all on one `device_type` device;
// aligned, shuffled and student of one floating dtype (the dispatcher casts mixed inputs to fp32); mask bool or
// real; lam in [0, 1]; baseline "mean" or "logmeanexp".
inline CreditRewardShape check_credit_reward_args(const at::Tensor& aligned, const at::Tensor& shuffled,
                                                  const at::Tensor& student, const at::Tensor& mask, double lam,
                                                  c10::string_view baseline, c10::DeviceType device_type,
                                                  int64_t max_partners) {
  constexpr const char* op = "credit_reward";
  auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ", c10::DeviceTypeName(device_type),
                " tensor, got ", t.device());
  };
  check_device(aligned, "aligned");
  check_device(shuffled, "shuffled");
  check_device(student, "student");
  check_device(mask, "mask");
  TORCH_CHECK(shuffled.device() == aligned.device() && student.device() == aligned.device() &&
                  mask.device() == aligned.device(),
              op, ": all tensors must be on one device, got ", aligned.device(), ", ", shuffled.device(), ", ",
              student.device(), ", ", mask.device());
  TORCH_CHECK(aligned.dim() == 2, op, ": aligned must be [B, T], got shape ", aligned.sizes());
  const int64_t B = aligned.size(0), T = aligned.size(1);
  TORCH_CHECK(shuffled.dim() == 3, op, ": shuffled must be [M, B, T], got shape ", shuffled.sizes());
  const int64_t M = shuffled.size(0);
  TORCH_CHECK(M >= 1, op, ": shuffled must hold M >= 1 partners, got M = ", M);
  TORCH_CHECK(M <= max_partners, op, ": shuffled must hold 1 <= M <= ", max_partners, " partners on ",
              c10::DeviceTypeName(device_type), ", got M = ", M);
  CHECK_SHAPE(op, shuffled, M, B, T);
  CHECK_SHAPE(op, student, B, T);
  CHECK_SHAPE(op, mask, B, T);
  TORCH_CHECK(aligned.scalar_type() == shuffled.scalar_type() && aligned.scalar_type() == student.scalar_type(), op,
              ": aligned, shuffled and student must share a dtype (the Python wrapper casts mixed inputs to fp32), "
              "got ",
              aligned.scalar_type(), ", ", shuffled.scalar_type(), ", ", student.scalar_type());
  TORCH_CHECK(at::isFloatingType(aligned.scalar_type()), op, ": inputs must be floating point, got ",
              aligned.scalar_type());
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1], got ", lam);
  TORCH_CHECK(baseline == "mean" || baseline == "logmeanexp", op, ": baseline must be \"mean\" or \"logmeanexp\", got \"",
              std::string(baseline), "\"");
  TORCH_CHECK(!mask.is_complex(), op, ": mask must be bool or real numbers, got ", mask.scalar_type());
  return {B, T, M};
}

}  // namespace credit

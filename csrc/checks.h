// Argument checks of every compiled op, defined once: TORCH_CHECKs whose messages name the op and the argument
// ("linear_logprob_fwd: targets must be int64, got Int"). `op` is a C string. The Python wrappers validate first and
// raise ValueError/TypeError; these guard the raw torch.ops.credit_C.* entry points.
#pragma once

#include <ATen/ATen.h>

#define CHECK_CPU(op, x) TORCH_CHECK((x).device().is_cpu(), op, ": " #x " must be a CPU tensor, got ", (x).device())
#define CHECK_CUDA(op, x) TORCH_CHECK((x).device().is_cuda(), op, ": " #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_DIM(op, x, n) TORCH_CHECK((x).dim() == (n), op, ": " #x " must be " #n "-D, got shape ", (x).sizes())
#define CHECK_INT64(op, x) \
  TORCH_CHECK((x).scalar_type() == at::kLong, op, ": " #x " must be int64, got ", (x).scalar_type())
#define CHECK_SHAPE(op, x, ...)                                                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), op, ": " #x " must have shape (" #__VA_ARGS__ \
              ") = ",                                                                                           \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

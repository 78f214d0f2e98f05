// The library `credit_C`: schemas live next to their kernels (TORCH_LIBRARY_FRAGMENT in each
// csrc/<topic>.cpp); this file only declares the namespace and makes `import credit_kernels._C`
// load the shared object, which runs the static registrations.
#include <Python.h>
#include <torch/library.h>

namespace {
bool has_cuda() {
#ifdef CREDIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(credit_C, m) {
  // Whether this build compiled csrc/cuda/ (a CPU-only torch builds C++ only).
  m.def("has_cuda() -> bool", &has_cuda);
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "credit compiled ops (see torch.ops.credit_C)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

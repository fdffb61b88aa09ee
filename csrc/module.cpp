// The Python module kdops._C and the kdops op library. Ops live in torch.ops.kdops: each family adds its schemas
// in csrc/ops_<family>.cpp (a TORCH_LIBRARY_FRAGMENT), its kernels in csrc/cpu and csrc/cuda, and its autograd
// and fake kernels in kdops/_ops/<family>.py. This module only has to load, and tells kdops how it was built
// so that a mismatch with the running torch gives one readable error.
#include <Python.h>
#include <torch/library.h>

#include "kdops_build_info.h"

#ifndef KDOPS_TORCH_VERSION
#define KDOPS_TORCH_VERSION "unknown"
#endif
#ifndef KDOPS_CUDA_VERSION
#define KDOPS_CUDA_VERSION ""
#endif
#ifndef KDOPS_WITH_CUDA
#define KDOPS_WITH_CUDA 0
#endif

TORCH_LIBRARY(kdops, m) {}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "kdops compiled kernels (see torch.ops.kdops)", -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "torch_version", KDOPS_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "cuda_version", KDOPS_CUDA_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", KDOPS_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

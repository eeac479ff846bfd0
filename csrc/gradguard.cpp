// Module init for the compiled kernel libraries. The op schemas are defined once, in Python
// (gradguard/_ops.py); these libraries only register device kernels for them
// (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda), so importing a module is all it takes.
//
// The CPU and the CUDA kernels are two modules (gradguard._C and gradguard._C_cuda), each built
// from this file with its own GRADGUARD_MODULE name, so a compile failure on one side (the x86
// ISA code on an aarch64 host, an nvcc/torch mismatch) cannot drop the other side's kernels.
#include <Python.h>

#ifndef GRADGUARD_MODULE
#define GRADGUARD_MODULE _C
#endif
#define GG_STR2(x) #x
#define GG_STR(x) GG_STR2(x)
#define GG_CAT2(a, b) a##b
#define GG_CAT(a, b) GG_CAT2(a, b)

#ifdef GRADGUARD_HOST_HELPERS
PyMethodDef* gradguard_host_methods();  // csrc/cpu/host_helpers.cpp
#endif

extern "C" {
PyObject* GG_CAT(PyInit_, GRADGUARD_MODULE)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      GG_STR(GRADGUARD_MODULE),
      "gradguard compiled kernels (registered with the PyTorch dispatcher on import)",
      -1,  // no per-module state
      nullptr,
  };
#ifdef GRADGUARD_HOST_HELPERS
  module_def.m_methods = gradguard_host_methods();
#endif
  return PyModule_Create(&module_def);
}
}

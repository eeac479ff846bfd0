// Module init for gradguard._C. The op schemas are defined once, in Python
// (gradguard/_ops.py); this library only registers device kernels for them
// (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda), so importing the module is all it takes.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "gradguard compiled kernels (registered with the PyTorch dispatcher on import)",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Schemas of the ag_kernels ops and the Python module ag_kernels._C that loads them.
//
// Each op writes its result into `out` and returns nothing; the schemas equal those of the Triton
// ops (namespace ag_kernels_triton), so ag_kernels/ops.py calls either backend the same way.
// Fake (meta) implementations live in Python (ag_kernels/_backends.py), as torch.compile needs.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing ag_kernels._C loads this library, whose static initializers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ag_kernels compiled ops (torch.ops.ag_kernels)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ag_kernels, m) {
  m.set_python_module("ag_kernels._backends");
  m.def("guided_denoise(Tensor(a!) out, Tensor d_main, Tensor? d_guide, Tensor? g_vec, float g) -> ()");
  m.def(
      "euler_step(Tensor(a!) out, Tensor x_hat, Tensor d_main, Tensor? d_guide, Tensor? g_vec, Tensor? s_vec, "
      "Tensor? sn_vec, float g, float s, float sn) -> ()");
  m.def(
      "heun_step(Tensor(a!) out, Tensor x_hat, Tensor x_euler, Tensor d_main, Tensor? d_guide, Tensor? g_vec, "
      "Tensor? s_vec, Tensor? sn_vec, float g, float s, float sn) -> ()");
  m.def(
      "guided_score(Tensor(a!) out, Tensor x, Tensor d_main, Tensor? d_guide, Tensor? g_vec, Tensor? s_vec, "
      "float g, float s) -> ()");
}

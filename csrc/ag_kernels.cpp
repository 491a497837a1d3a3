// Schemas of the ag_kernels ops and the Python module ag_kernels._C that loads them.
//
// Each op writes its result into `out` and returns nothing; the schemas equal those of the Triton
// ops (namespace ag_kernels_triton), so ag_kernels/ops.py calls either backend the same way.
// Fake (meta) implementations live in Python (ag_kernels/_backends.py), as torch.compile needs.
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "cpu/cpu_isa.h"

namespace {

// Private test hooks of the CPU kernels' ISA variant (see cpu/cpu_isa.h); not part of the API.
PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ag_kernels::cpu_isa().c_str()); }

PyObject* py_cpu_isas(PyObject*, PyObject*) {
  const auto names = ag_kernels::cpu_isas();
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t k = 0; k < names.size(); ++k) {
    PyObject* name = PyUnicode_FromString(names[k].c_str());
    if (name == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(k), name);
  }
  return tuple;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    return PyUnicode_FromString(ag_kernels::set_cpu_isa(name).c_str());
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_ValueError, exc.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"_cpu_isa", py_cpu_isa, METH_NOARGS, "Private: the ISA variant (default/avx2/avx512) the CPU ops run."},
    {"_cpu_isas", py_cpu_isas, METH_NOARGS, "Private: the ISA variants this CPU and build can run."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O,
     "Private, for tests: selects the CPU ops' ISA variant by name and returns the previous one's name."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing ag_kernels._C loads this library, whose static initializers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ag_kernels compiled ops (torch.ops.ag_kernels)",
                                          -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ag_kernels, m) {
  m.set_python_module("ag_kernels.kernels._backends");
  // CFG's third output comes last with defaults (none), so two-output calls read as before.
  m.def(
      "guided_denoise(Tensor(a!) out, Tensor d_main, Tensor? d_guide, Tensor? g_vec, float g, "
      "Tensor? d_uncond=None, Tensor? c_vec=None, float c=1.0) -> ()");
  m.def(
      "euler_step(Tensor(a!) out, Tensor x_hat, Tensor d_main, Tensor? d_guide, Tensor? g_vec, Tensor? s_vec, "
      "Tensor? sn_vec, float g, float s, float sn, Tensor? d_uncond=None, Tensor? c_vec=None, float c=1.0) -> ()");
  m.def(
      "heun_step(Tensor(a!) out, Tensor x_hat, Tensor x_euler, Tensor d_main, Tensor? d_guide, Tensor? g_vec, "
      "Tensor? s_vec, Tensor? sn_vec, float g, float s, float sn, Tensor? d_uncond=None, Tensor? c_vec=None, "
      "float c=1.0) -> ()");
  m.def(
      "guided_score(Tensor(a!) out, Tensor x, Tensor d_main, Tensor? d_guide, Tensor? g_vec, Tensor? s_vec, "
      "float g, float s, Tensor? d_uncond=None, Tensor? c_vec=None, float c=1.0) -> ()");
  m.def(
      "multistep_step(Tensor(a!) out, Tensor(b!) history, Tensor x, Tensor d_main, Tensor? d_guide, Tensor? g_vec, "
      "float g, float a, float b0, float b1, float b2, int read1, int read2, int write, Tensor(c!)? corrected=None, "
      "float ac=0., float c0=0., float c1=0., float c2=0., Tensor? d_uncond=None, Tensor? c_vec=None, "
      "float c=1.0) -> ()");
}

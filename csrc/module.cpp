// The extension module rome_fast._C. Importing it loads this library, whose static initialisers
// register the ops with PyTorch's dispatcher (TORCH_LIBRARY_FRAGMENT in csrc/ and csrc/cpu/, the
// CUDA kernels in csrc/cuda/register.cpp); Python then calls them as torch.ops.rome_fast.*
// (wrapped in rome_fast/ops/). The module itself only says whether the CUDA kernels are in.
#include <Python.h>

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef ROME_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "rome_fast's compiled core: the ops are torch.ops.rome_fast.*", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }

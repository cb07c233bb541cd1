// fastres._C: the schemas of the compiled kernel ops, their CPU registrations, and the Python
// module that loading them needs (`import fastres._C` runs the registrations below).
#include <fastres/kernels.h>

#include <Python.h>
#include <torch/library.h>

// FRAGMENT: fastres's Python code defines more ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def(
      "_fold_bn(Tensor conv_weight, Tensor? conv_bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps) -> (Tensor, Tensor)");
  m.def("_add_relu(Tensor x, Tensor residual) -> Tensor");
  m.def(
      "_bn_act_forward(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, bool relu, "
      "Tensor? center=None) -> Tensor");
  m.def(
      "_bn_act_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor invstd, "
      "Tensor? weight, bool relu, bool training, bool residual_grad) -> "
      "(Tensor grad_y, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "_bn_stats(Tensor y, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "float momentum, float eps) -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift, "
      "Tensor new_running_mean, Tensor new_running_var)");
  m.def(
      "_bn_apply(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? residual_scale, "
      "Tensor? residual_shift, bool relu, bool mask, Tensor? center=None, Tensor? residual_center=None) -> "
      "(Tensor out, Tensor mask)");
  m.def(
      "_bn_apply_backward(Tensor grad_out, Tensor? out, Tensor? mask, Tensor y, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor? residual, Tensor? residual_mean, "
      "Tensor? residual_invstd, Tensor? residual_weight, bool relu, bool training, "
      "bool residual_grad) -> (Tensor grad_y, Tensor grad_residual, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_residual_weight, Tensor grad_residual_bias)");
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("_fold_bn", &fastres::fold_bn_cpu);
  m.impl("_add_relu", &fastres::add_relu_cpu);
  m.impl("_bn_act_forward", &fastres::bn_act_forward_cpu);
  m.impl("_bn_act_backward", &fastres::bn_act_backward_cpu);
  m.impl("_bn_stats", &fastres::bn_stats_cpu);
  m.impl("_bn_apply", &fastres::bn_apply_cpu);
  m.impl("_bn_apply_backward", &fastres::bn_apply_backward_cpu);
}

namespace fastres {
// csrc/plan_guard.cpp
PyObject* module_signature(PyObject* self, PyObject* args);
PyObject* tensor_state_guard(PyObject* self, PyObject* args);
PyObject* plan_changed(PyObject* self, PyObject* args);
// csrc/cpu_threads.cpp
PyObject* pin_intraop_workers(PyObject* self, PyObject* args);
}  // namespace fastres

namespace {

PyObject* with_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef FASTRES_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef module_methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS,
     "True when this build of fastres._C includes the CUDA kernels."},
    {"_module_signature", fastres::module_signature, METH_VARARGS,
     "_module_signature(root, modules: tuple) -> bytes: each module's class, training flag, whether it has "
     "hooks, and the identity of its children, parameters and buffers (the CPU eval plan's guard)."},
    {"_tensor_state_guard", fastres::tensor_state_guard, METH_VARARGS,
     "_tensor_state_guard(tensors, whole_elements, sampled_elements) -> guard: the tensors' version counters, "
     "pointers, dtypes, shapes, strides and (sampled) bytes now, held with the tensors (the CPU eval plan's "
     "guard)."},
    {"_plan_changed", fastres::plan_changed, METH_VARARGS,
     "_plan_changed(root, modules, signature, entries, guard, grad_enabled) -> bool: whether _module_signature(root, "
     "modules) != signature, or for any (obj, name, recorded) of entries getattr(obj, name) is neither recorded "
     "itself nor equal to it in the same type, or any of the guard's tensors changed since _tensor_state_guard or "
     "(grad_enabled) requires a gradient; the modules checked by the caller's thread while the other intra-op "
     "threads check the tensors (the CPU eval plan's guard)."},
    {"_pin_intraop_workers", fastres::pin_intraop_workers, METH_VARARGS,
     "_pin_intraop_workers(cpus: tuple) -> int: pins ATen's intra-op worker thread t (t >= 1; never the caller's) "
     "to cpus[t], one CPU per thread; returns how many it pinned (0 without OpenMP or off Linux)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "fastres._C",
                          "Compiled CPU and CUDA kernels of fastres, registered as torch.ops.fastres.*",
                          -1, module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }

// detrkit._C: registers detrkit's custom operators with the PyTorch dispatcher.
//
// Importing the module (or torch.ops.load_library on the .so) runs these static registrations.
// The schema lives here; the Python side (detrkit/layers/ms_deform_attn/op.py) adds the fake
// kernels and the autograd formula, and serves devices without a kernel with the pure-PyTorch
// reference.
#include <Python.h>

#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn.h"

TORCH_LIBRARY(detrkit, m) {
  // Fake kernels and the autograd formula are registered from this Python module.
  m.set_python_module("detrkit.layers.ms_deform_attn.op");
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(detrkit, CPU, m) {
  m.impl("ms_deform_attn_forward", &detrkit::msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &detrkit::msda::backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(detrkit, CUDA, m) {
  m.impl("ms_deform_attn_forward", &detrkit::msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &detrkit::msda::backward_cuda);
}
#endif

// A Python module with no attributes: the operators are reached through torch.ops.detrkit.
static struct PyModuleDef detrkit_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&detrkit_c_module); }

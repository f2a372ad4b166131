// Host-side entry points of the multi-scale deformable attention kernels and the helpers they
// share: argument checks and the (value dtype, location dtype) dispatch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <tuple>

#include "ms_deform_attn/common.h"

namespace detrkit {
namespace msda {

// Checks everything that does not need the data of spatial_shapes: ranks, matching sizes, the
// dtype rule, devices and contiguity. Raises c10::Error (RuntimeError in Python) naming the
// argument at fault.
Dims check_forward_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights);

// check_forward_args plus grad_output (N, Lq, M * D) in value's dtype.
Dims check_backward_args(const at::Tensor& grad_output, const at::Tensor& value,
                         const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// Checks the data of CPU-resident spatial_shapes / level_start_index: positive sizes, starts
// equal to the running sum, total equal to value's length S.
void check_level_data(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      int64_t S);

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}, TypeTag<loc_t>{}) for the accepted (value, location) dtype pairs:
// (f32, f32), (f64, f64), (f16, f16), (f16, f32), (bf16, bf16), (bf16, f32).
template <typename F>
void dispatch_dtypes(at::ScalarType value_type, at::ScalarType loc_type, const char* name, F&& f) {
  using at::ScalarType;
  if (value_type == ScalarType::Float && loc_type == ScalarType::Float) {
    f(TypeTag<float>{}, TypeTag<float>{});
  } else if (value_type == ScalarType::Double && loc_type == ScalarType::Double) {
    f(TypeTag<double>{}, TypeTag<double>{});
  } else if (value_type == ScalarType::Half && loc_type == ScalarType::Half) {
    f(TypeTag<c10::Half>{}, TypeTag<c10::Half>{});
  } else if (value_type == ScalarType::Half && loc_type == ScalarType::Float) {
    f(TypeTag<c10::Half>{}, TypeTag<float>{});
  } else if (value_type == ScalarType::BFloat16 && loc_type == ScalarType::BFloat16) {
    f(TypeTag<c10::BFloat16>{}, TypeTag<c10::BFloat16>{});
  } else if (value_type == ScalarType::BFloat16 && loc_type == ScalarType::Float) {
    f(TypeTag<c10::BFloat16>{}, TypeTag<float>{});
  } else {
    TORCH_CHECK(false, name, ": unsupported dtype combination value=", value_type,
                ", sampling_locations/attention_weights=", loc_type);
  }
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

#ifdef WITH_CUDA
at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);
#endif

}  // namespace msda
}  // namespace detrkit

// CUDA kernel of multi-scale deformable attention, forward and backward.
//
// Work split: a group of G lanes of one warp (G a power of two, at most 32) serves one
// (n, q, m) triple; each lane owns VEC consecutive channels (a 4, 8 or 16 byte vector load per
// corner), so a group covers D channels in ceil(D / (G * VEC)) rounds, one round for the
// standard D = 32 (G = 8 lanes of float4 in fp32, G = 4 lanes of 8 x bf16). The L * P locations
// and weights of the triple are loaded once, one point per lane, and passed around the group
// with shuffles.
//
// Backward: the same split. Each lane computes its channels' part of the location and weight
// gradients, the group reduces them with xor shuffles (no atomics for those), and grad_value
// is accumulated with vector atomics (float4 / float2 on sm_90) into a float32 buffer: grad_value
// itself for float32, a workspace cast at the end for float16 / bfloat16, double for float64.
//
// The kernels are in kernels.cuh (device code only, also compiled by the CPU emulation the tests
// run on machines without a GPU), the launch configuration in launch_plan.h (plain host code,
// also called by the emulation); this file holds the launchers. The bilinear math is common.h,
// shared with the CPU kernel. Design target (H100, encoder shape, batch 2): forward <= 0.4 ms
// fp32 / 0.25 ms bf16, forward + backward <= 1.5 ms bf16; not yet measured on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ms_deform_attn/common.h"
#include "ms_deform_attn/cuda/kernels.cuh"
#include "ms_deform_attn/ms_deform_attn.h"

namespace detrkit {
namespace msda {

namespace {

using namespace cuda_kernels;

// Checks the plan and launches launch(integral_constant<int, VEC>) for its vector width.
template <typename scalar_t, typename F>
void launch_with(const LaunchPlan& plan, F&& launch) {
  TORCH_CHECK(plan.error.empty(), plan.error);
  const bool launched = dispatch_vec<scalar_t>(plan.vec, launch);
  TORCH_CHECK(launched, "ms_deform_attn: internal error, no kernel for vector width ", plan.vec);
}

void check_cuda(const at::Tensor& value) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: the CUDA kernel got value on ", value.device());
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const Dims d = check_forward_args(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
  check_cuda(value);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  if (d.S == 0 || d.L == 0 || d.P == 0) return out.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward",
      [&](auto value_tag, auto loc_tag) {
        using scalar_t = typename decltype(value_tag)::type;
        using loc_t = typename decltype(loc_tag)::type;
        const LaunchPlan plan =
            plan_forward(d, sizeof(scalar_t), value.const_data_ptr(), out.const_data_ptr());
        launch_with<scalar_t>(plan, [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          forward_kernel<scalar_t, loc_t, VEC><<<plan.grid, plan.block, plan.smem, stream>>>(
              value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
              level_start_index.const_data_ptr<int64_t>(),
              sampling_locations.const_data_ptr<loc_t>(), attention_weights.const_data_ptr<loc_t>(),
              out.mutable_data_ptr<scalar_t>(), d.N * d.Lq * d.M, d.Lq, static_cast<int>(d.M),
              static_cast<int>(d.D), d.S, static_cast<int>(d.L), static_cast<int>(d.P), plan.group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = check_backward_args(grad_output, value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  check_cuda(value);
  const c10::cuda::CUDAGuard guard(value.device());
  const bool direct = value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble;
  // float32 / float64 accumulate in grad_value itself; half types in a float32 workspace.
  at::Tensor grad_acc = direct ? at::zeros_like(value)
                               : at::zeros(value.sizes(), value.options().dtype(at::kFloat));
  const bool empty = grad_output.numel() == 0 || sampling_locations.numel() == 0 || d.S == 0;
  // Every element of these two is written by the kernel (when it runs).
  at::Tensor grad_loc =
      empty ? at::zeros_like(sampling_locations) : at::empty_like(sampling_locations);
  at::Tensor grad_attn =
      empty ? at::zeros_like(attention_weights) : at::empty_like(attention_weights);
  if (!empty) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtypes(
        value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward",
        [&](auto value_tag, auto loc_tag) {
          using scalar_t = typename decltype(value_tag)::type;
          using loc_t = typename decltype(loc_tag)::type;
          using acc_t = typename AccType<scalar_t>::type;
          const LaunchPlan plan = plan_backward(d, sizeof(scalar_t), value.const_data_ptr(),
                                                grad_output.const_data_ptr());
          launch_with<scalar_t>(plan, [&](auto vec_tag) {
            constexpr int VEC = decltype(vec_tag)::value;
            backward_kernel<scalar_t, loc_t, VEC><<<plan.grid, plan.block, plan.smem, stream>>>(
                grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                spatial_shapes.const_data_ptr<int64_t>(),
                level_start_index.const_data_ptr<int64_t>(),
                sampling_locations.const_data_ptr<loc_t>(),
                attention_weights.const_data_ptr<loc_t>(), grad_acc.mutable_data_ptr<acc_t>(),
                grad_loc.mutable_data_ptr<loc_t>(), grad_attn.mutable_data_ptr<loc_t>(),
                d.N * d.Lq * d.M, d.Lq, static_cast<int>(d.M), static_cast<int>(d.D), d.S,
                static_cast<int>(d.L), static_cast<int>(d.P), plan.group);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }
  at::Tensor grad_value = direct ? grad_acc : grad_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace detrkit

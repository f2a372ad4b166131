// C entry points that run the CUDA kernels of ../kernels.cuh under the CPU emulation, for the
// tests (loaded with ctypes; built by the test with the host compiler, not by setup.py).
//
// Each kernel entry takes raw contiguous buffers laid out like the operator's arguments, plans
// the launch with the launcher's own plan_forward / plan_backward and dispatch_vec
// (../launch_plan.h), so the vector width follows the buffers' alignment as on a GPU, and runs
// the kernel with that grid, block and shared memory. It writes the plan to plan_out (grid,
// block, shared memory bytes, vector width, group size) and returns 0, or:
//   -1  the planner refused the sizes,
//   -2  a block wrote past the shared memory the plan gave it,
//   -3  no kernel for the planned vector width.
// msda_plan_launch runs the planner alone.
#include "ms_deform_attn/cuda/emulation/cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ms_deform_attn/cuda/kernels.cuh"
#include "ms_deform_attn/cuda/launch_plan.h"

namespace {

using detrkit::msda::AccType;
using detrkit::msda::Dims;
using namespace detrkit::msda::cuda_kernels;

void write_plan(const LaunchPlan& plan, int64_t* plan_out) {
  plan_out[0] = plan.grid;
  plan_out[1] = plan.block;
  plan_out[2] = static_cast<int64_t>(plan.smem);
  plan_out[3] = plan.vec;
  plan_out[4] = plan.group;
}

// Runs launch(VEC) under the plan; the status code of the file comment.
template <typename scalar_t, typename Launch>
int run_planned(const LaunchPlan& plan, int64_t* plan_out, Launch&& launch) {
  write_plan(plan, plan_out);
  if (!plan.error.empty()) return -1;
  bool fits = true;
  if (!dispatch_vec<scalar_t>(plan.vec, [&](auto vec_tag) { fits = launch(vec_tag); })) return -3;
  return fits ? 0 : -2;
}

template <typename scalar_t, typename loc_t>
int forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const loc_t* loc,
            const loc_t* attn, scalar_t* out, const Dims& d, int64_t* plan_out) {
  const LaunchPlan plan = plan_forward(d, sizeof(scalar_t), value, out);
  return run_planned<scalar_t>(plan, plan_out, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    return msda_emulation::launch(plan.grid, plan.block, plan.smem, [&] {
      forward_kernel<scalar_t, loc_t, VEC>(value, shapes, starts, loc, attn, out, d.N * d.Lq * d.M,
                                           d.Lq, static_cast<int>(d.M), static_cast<int>(d.D), d.S,
                                           static_cast<int>(d.L), static_cast<int>(d.P),
                                           plan.group);
    });
  });
}

template <typename scalar_t, typename loc_t>
int backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
             const int64_t* starts, const loc_t* loc, const loc_t* attn,
             typename AccType<scalar_t>::type* grad_value, loc_t* grad_loc, loc_t* grad_attn,
             const Dims& d, int64_t* plan_out) {
  const LaunchPlan plan = plan_backward(d, sizeof(scalar_t), value, grad_out);
  return run_planned<scalar_t>(plan, plan_out, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    return msda_emulation::launch(plan.grid, plan.block, plan.smem, [&] {
      backward_kernel<scalar_t, loc_t, VEC>(grad_out, value, shapes, starts, loc, attn, grad_value,
                                            grad_loc, grad_attn, d.N * d.Lq * d.M, d.Lq,
                                            static_cast<int>(d.M), static_cast<int>(d.D), d.S,
                                            static_cast<int>(d.L), static_cast<int>(d.P),
                                            plan.group);
    });
  });
}

}  // namespace

// The planner alone, for elements of elem_size bytes at the two addresses the launcher would
// pass (value and out, or value and grad_output). Returns 0, or -1 with the reason in
// error (a buffer of error_size bytes).
extern "C" int msda_plan_launch(int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                                int64_t P, int64_t elem_size, uintptr_t first, uintptr_t second,
                                int64_t* plan_out, char* error, int64_t error_size) {
  const LaunchPlan plan =
      plan_launch(Dims{N, S, M, D, Lq, L, P}, static_cast<size_t>(elem_size),
                  {reinterpret_cast<const void*>(first), reinterpret_cast<const void*>(second)});
  write_plan(plan, plan_out);
  std::snprintf(error, static_cast<size_t>(error_size), "%s", plan.error.c_str());
  return plan.error.empty() ? 0 : -1;
}

#define MSDA_EMULATED_ENTRIES(SUFFIX, SCALAR, LOC)                                              \
  extern "C" int msda_emulated_forward_##SUFFIX(                                                \
      const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,         \
      const void* attn, void* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq,      \
      int64_t L, int64_t P, int64_t* plan_out) {                                                \
    return forward(static_cast<const SCALAR*>(value), shapes, starts,                           \
                   static_cast<const LOC*>(loc), static_cast<const LOC*>(attn),                 \
                   static_cast<SCALAR*>(out), Dims{N, S, M, D, Lq, L, P}, plan_out);            \
  }                                                                                             \
  extern "C" int msda_emulated_backward_##SUFFIX(                                               \
      const void* grad_out, const void* value, const int64_t* shapes, const int64_t* starts,    \
      const void* loc, const void* attn, void* grad_value, void* grad_loc, void* grad_attn,     \
      int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P,             \
      int64_t* plan_out) {                                                                      \
    return backward(static_cast<const SCALAR*>(grad_out), static_cast<const SCALAR*>(value),    \
                    shapes, starts, static_cast<const LOC*>(loc), static_cast<const LOC*>(attn), \
                    static_cast<AccType<SCALAR>::type*>(grad_value), static_cast<LOC*>(grad_loc), \
                    static_cast<LOC*>(grad_attn), Dims{N, S, M, D, Lq, L, P}, plan_out);        \
  }

// The (value, location) dtype pairs of dispatch_dtypes in ../../ms_deform_attn.h.
MSDA_EMULATED_ENTRIES(f32, float, float)
MSDA_EMULATED_ENTRIES(f64, double, double)
MSDA_EMULATED_ENTRIES(f16_f16, c10::Half, c10::Half)
MSDA_EMULATED_ENTRIES(f16_f32, c10::Half, float)
MSDA_EMULATED_ENTRIES(bf16_bf16, c10::BFloat16, c10::BFloat16)
MSDA_EMULATED_ENTRIES(bf16_f32, c10::BFloat16, float)

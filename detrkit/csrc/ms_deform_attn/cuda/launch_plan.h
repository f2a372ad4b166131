// Launch planning of the CUDA kernels of multi-scale deformable attention: grid, block,
// dynamic shared memory, vector width and group size, as plain host code.
//
// The CUDA launcher (ms_deform_attn_cuda.cu) and the CPU emulation the tests run
// (emulation/emulate.cc) both call plan_forward / plan_backward and dispatch_vec, so the
// emulated kernels run with exactly the launch configuration a GPU gets, and the planner itself
// is tested (tests/test_ms_deform_attn_cuda.py). Standard library only: no CUDA, no ATen.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "ms_deform_attn/common.h"

namespace detrkit {
namespace msda {
namespace cuda_kernels {

// 256 threads per block (the kernels' __launch_bounds__).
constexpr int kBlock = 256;
// Most levels per call: bounds the level table in shared memory (16 KiB).
constexpr int kMaxLevels = 1024;

// Dynamic shared memory of one block: the level table, for each level its first row of value
// (int64) and its (H, W) (two int32), laid out as L int64 then 2 * L int32 (see
// load_level_table in kernels.cuh).
constexpr size_t level_table_bytes(int64_t L) {
  return static_cast<size_t>(L) * (sizeof(int64_t) + 2 * sizeof(int32_t));
}

// Widest vector of channels (up to 16 bytes) that divides D and keeps every pointer aligned.
inline int pick_vec(int64_t D, size_t elem_size, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / elem_size);
  auto aligned = [&](int v) {
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (v * elem_size) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && (D % vec != 0 || !aligned(vec))) vec /= 2;
  return vec;
}

// Lanes serving one (n, q, m) triple: the smallest power of two covering D / vec chunks, at most
// a warp (wider D takes several rounds).
inline int pick_group(int64_t D, int vec) {
  const int64_t chunks = (D + vec - 1) / vec;
  int g = 1;
  while (g < chunks && g < 32) g *= 2;
  return g;
}

struct LaunchPlan {
  unsigned grid = 0;   // blocks
  int block = kBlock;  // threads per block
  size_t smem = 0;     // dynamic shared memory bytes per block
  int vec = 1;         // channels per lane and load
  int group = 1;       // lanes per (n, q, m) triple
  std::string error;   // why the call cannot be launched; empty when it can
};

// The launch for sizes d, elements of elem_size bytes, and the pointers whose alignment bounds
// the vector width.
inline LaunchPlan plan_launch(const Dims& d, size_t elem_size,
                              std::initializer_list<const void*> ptrs) {
  LaunchPlan plan;
  if (d.L > kMaxLevels) {
    plan.error = "ms_deform_attn: at most " + std::to_string(kMaxLevels) + " levels, got " +
                 std::to_string(d.L);
    return plan;
  }
  if (d.M > INT_MAX || d.D > INT_MAX || d.L * d.P > INT_MAX) {
    plan.error = "ms_deform_attn: heads, channels and points must each fit in int32";
    return plan;
  }
  plan.vec = pick_vec(d.D, elem_size, ptrs);
  plan.group = pick_group(d.D, plan.vec);
  const int64_t groups = d.N * d.Lq * d.M;
  const int64_t blocks = (groups * plan.group + kBlock - 1) / kBlock;
  if (blocks > INT_MAX) {
    plan.error = "ms_deform_attn: too many queries for one launch (" + std::to_string(groups) +
                 " (n, q, m) triples)";
    return plan;
  }
  plan.grid = static_cast<unsigned>(blocks);
  plan.smem = level_table_bytes(d.L);
  return plan;
}

// Forward: loads from value, stores to out.
inline LaunchPlan plan_forward(const Dims& d, size_t elem_size, const void* value,
                               const void* out) {
  return plan_launch(d, elem_size, {value, out});
}

// Backward: loads from value and grad_output; the grad_value accumulation buffer is a fresh
// allocation with value's element offsets, aligned whenever value is.
inline LaunchPlan plan_backward(const Dims& d, size_t elem_size, const void* value,
                                const void* grad_output) {
  return plan_launch(d, elem_size, {value, grad_output});
}

// Calls f(std::integral_constant<int, VEC>{}) for the planned vector width, if a kernel exists
// for it (VEC * sizeof(scalar_t) <= 16 bytes); returns false otherwise.
template <typename scalar_t, typename F>
bool dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 1:
      f(std::integral_constant<int, 1>{});
      return true;
    case 2:
      f(std::integral_constant<int, 2>{});
      return true;
    case 4:
      if constexpr (4 * sizeof(scalar_t) <= 16) {
        f(std::integral_constant<int, 4>{});
        return true;
      }
      return false;
    case 8:
      if constexpr (8 * sizeof(scalar_t) <= 16) {
        f(std::integral_constant<int, 8>{});
        return true;
      }
      return false;
    default:
      return false;
  }
}

}  // namespace cuda_kernels
}  // namespace msda
}  // namespace detrkit

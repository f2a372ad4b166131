// Device code of the CUDA kernel of multi-scale deformable attention (see
// ms_deform_attn_cuda.cu for the launchers and the design notes, launch_plan.h for the launch
// configuration).
//
// This header depends on common.h and the standard library only, so that the same kernels can
// also be compiled as host code by the CPU emulation of warps used in the tests
// (emulation/cuda_emulation.h, MSDA_CUDA_EMULATION): their thread mapping, shuffles and
// reductions get checked on machines without a GPU.
#pragma once

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "ms_deform_attn/common.h"
#include "ms_deform_attn/cuda/launch_plan.h"

#if defined(MSDA_CUDA_EMULATION)
#define MSDA_LEVEL_SMEM(name) int64_t* name = ::msda_emulation::dynamic_shared<int64_t>()
#else
#define MSDA_LEVEL_SMEM(name) extern __shared__ int64_t name[]
#endif

namespace detrkit {
namespace msda {
namespace cuda_kernels {

// Minimum resident blocks of kBlock threads per SM, i.e. register caps: forward 4 (<= 64
// registers, about 50 needed), backward 3 (<= 85, about 80 needed): both compile without spills
// for sm_80 and sm_90 in float32 / float16 / bfloat16 (checked with -Xptxas -v).
constexpr int kForwardMinBlocks = 4;
constexpr int kBackwardMinBlocks = 3;
constexpr unsigned kFullMask = 0xffffffffu;

// Loads the level table (start row, H, W) into shared memory (level_table_bytes(L) of
// launch_plan.h: L int64 starts, then 2 * L int32 sizes). A level whose rows would fall
// outside value's S rows (inconsistent arguments that escaped the host checks, e.g. under
// torch.compile) gets size 0, so it reads nothing instead of reading out of bounds.
__device__ __forceinline__ void load_level_table(const int64_t* __restrict__ spatial_shapes,
                                                 const int64_t* __restrict__ level_start, int L,
                                                 int64_t S, int64_t* s_start, int* s_hw) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const int64_t h = spatial_shapes[2 * l];
    const int64_t w = spatial_shapes[2 * l + 1];
    const int64_t start = level_start[l];
    const bool ok = h > 0 && w > 0 && h <= kMaxLevelSize && w <= kMaxLevelSize &&
                    h * w <= kMaxLevelSize && start >= 0 && start + h * w <= S;
    s_start[l] = ok ? start : 0;
    s_hw[2 * l] = ok ? static_cast<int>(h) : 0;
    s_hw[2 * l + 1] = ok ? static_cast<int>(w) : 0;
  }
  __syncthreads();
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* dst, const acc_t* src) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int c = 0; c < VEC; ++c) pk.v[c] = static_cast<scalar_t>(src[c]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(dst) = pk;
}

// grad_value accumulation: vector atomics where the architecture has them (sm_90: float2 and
// float4 atomicAdd on global memory), scalar ones elsewhere.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;
#else
constexpr bool kVectorAtomics = false;
#endif

template <int VEC>
__device__ __forceinline__ void atomic_add_chunk(float* dst, float scale, const float* g) {
  if constexpr (kVectorAtomics && VEC % 4 == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(scale * g[i], scale * g[i + 1], scale * g[i + 2], scale * g[i + 3]));
    }
#endif
  } else if constexpr (kVectorAtomics && VEC == 2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(scale * g[0], scale * g[1]));
#endif
  } else {
#pragma unroll
    for (int c = 0; c < VEC; ++c) atomicAdd(dst + c, scale * g[c]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_chunk(double* dst, double scale, const double* g) {
#pragma unroll
  for (int c = 0; c < VEC; ++c) atomicAdd(dst + c, scale * g[c]);
}

// The grad_value sink of sample_point_backward on the device: `base` is this lane's first
// channel in row 0 of the current level of the (n, m) slice of the accumulation buffer.
template <int VEC, typename acc_t>
struct AtomicSink {
  acc_t* base;
  int64_t row_stride;
  __device__ __forceinline__ void operator()(int64_t row, int /*chunk*/, acc_t scale,
                                             const acc_t* g) const {
    atomic_add_chunk<VEC>(base + row * row_stride, scale, g);
  }
};

// The (batch n, query, head m) group a thread works on, G lanes per group. Out-of-range groups
// in the last warp still take part in the shuffles, on a copy of the last group's work
// (`active` false), and store nothing.
struct GroupIndex {
  int lane;
  bool active;
  int64_t group;
  int64_t n;
  int m;
};

__device__ __forceinline__ GroupIndex group_index(int64_t num_groups, int64_t Lq, int M, int G) {
  GroupIndex index;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t wanted = thread / G;
  index.lane = threadIdx.x & (G - 1);
  index.active = wanted < num_groups;
  index.group = index.active ? wanted : num_groups - 1;
  index.n = index.group / (Lq * M);
  index.m = static_cast<int>(index.group % M);
  return index;
}

template <typename scalar_t, typename loc_t, int VEC>
__global__ void __launch_bounds__(kBlock, kForwardMinBlocks)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start, const loc_t* __restrict__ loc,
                   const loc_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t num_groups,
                   int64_t Lq, int M, int D, int64_t S, int L, int P, int G) {
  using acc_t = typename AccType<scalar_t>::type;
  MSDA_LEVEL_SMEM(level_smem);
  int64_t* s_start = level_smem;
  int* s_hw = reinterpret_cast<int*>(level_smem + L);
  load_level_table(spatial_shapes, level_start, L, S, s_start, s_hw);

  const GroupIndex index = group_index(num_groups, Lq, M, G);
  const int lane = index.lane;
  const bool active = index.active;
  const int64_t group = index.group;
  const int64_t n = index.n;
  const int m = index.m;
  const int LP = L * P;
  const loc_t* loc_g = loc + group * LP * 2;
  const loc_t* attn_g = attn + group * LP;
  const int64_t row_stride = static_cast<int64_t>(M) * D;
  const scalar_t* value_nm = value + (n * S * M + m) * D;
  const int span = G * VEC;
  const int rounds = (D + span - 1) / span;

  for (int r = 0; r < rounds; ++r) {
    const int c0 = r * span + lane * VEC;
    const bool has_channels = c0 < D;
    acc_t acc[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[c] = 0;
    for (int first = 0; first < LP; first += G) {
      const int mine = first + lane;
      acc_t my_x = 0, my_y = 0, my_w = 0;
      if (mine < LP) {
        my_x = static_cast<acc_t>(loc_g[2 * mine]);
        my_y = static_cast<acc_t>(loc_g[2 * mine + 1]);
        my_w = static_cast<acc_t>(attn_g[mine]);
      }
      const int count = min(G, LP - first);
      for (int t = 0; t < count; ++t) {
        const acc_t x = __shfl_sync(kFullMask, my_x, t, G);
        const acc_t y = __shfl_sync(kFullMask, my_y, t, G);
        const acc_t w = __shfl_sync(kFullMask, my_w, t, G);
        const int l = (first + t) / P;
        Bilinear<acc_t> b;
        if (has_channels && bilinear_setup(x, y, s_hw[2 * l], s_hw[2 * l + 1], b)) {
          sample_point_forward<VEC>(value_nm + s_start[l] * row_stride + c0, row_stride, b, w, 1,
                                    0, acc);
        }
      }
    }
    if (active && has_channels) store_chunk<VEC>(out + group * D + c0, acc);
  }
}

template <typename scalar_t, typename loc_t, int VEC>
__global__ void __launch_bounds__(kBlock, kBackwardMinBlocks)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ spatial_shapes,
                    const int64_t* __restrict__ level_start, const loc_t* __restrict__ loc,
                    const loc_t* __restrict__ attn,
                    typename AccType<scalar_t>::type* __restrict__ grad_value,
                    loc_t* __restrict__ grad_loc, loc_t* __restrict__ grad_attn,
                    int64_t num_groups, int64_t Lq, int M, int D, int64_t S, int L, int P, int G) {
  using acc_t = typename AccType<scalar_t>::type;
  MSDA_LEVEL_SMEM(level_smem);
  int64_t* s_start = level_smem;
  int* s_hw = reinterpret_cast<int*>(level_smem + L);
  load_level_table(spatial_shapes, level_start, L, S, s_start, s_hw);

  const GroupIndex index = group_index(num_groups, Lq, M, G);
  const int lane = index.lane;
  const bool active = index.active;
  const int64_t group = index.group;
  const int64_t n = index.n;
  const int m = index.m;
  const int LP = L * P;
  const loc_t* loc_g = loc + group * LP * 2;
  const loc_t* attn_g = attn + group * LP;
  const int64_t row_stride = static_cast<int64_t>(M) * D;
  const int64_t nm_offset = (n * S * M + m) * D;
  const scalar_t* value_nm = value + nm_offset;
  acc_t* grad_value_nm = grad_value + nm_offset;
  const scalar_t* grad_out_g = grad_out + group * D;
  const int span = G * VEC;
  const int rounds = (D + span - 1) / span;

  for (int first = 0; first < LP; first += G) {
    const int mine = first + lane;
    acc_t my_x = 0, my_y = 0, my_w = 0;
    if (mine < LP) {
      my_x = static_cast<acc_t>(loc_g[2 * mine]);
      my_y = static_cast<acc_t>(loc_g[2 * mine + 1]);
      my_w = static_cast<acc_t>(attn_g[mine]);
    }
    const int count = min(G, LP - first);
    for (int t = 0; t < count; ++t) {
      const acc_t x = __shfl_sync(kFullMask, my_x, t, G);
      const acc_t y = __shfl_sync(kFullMask, my_y, t, G);
      const acc_t w = __shfl_sync(kFullMask, my_w, t, G);
      const int l = (first + t) / P;
      const int h = s_hw[2 * l];
      const int wd = s_hw[2 * l + 1];
      acc_t g_attn = 0, g_px = 0, g_py = 0;
      Bilinear<acc_t> b;
      // (an inactive copy of the last group must not add its gradient a second time)
      if (active && bilinear_setup(x, y, h, wd, b)) {
        const int64_t level_offset = s_start[l] * row_stride;
        for (int r = 0; r < rounds; ++r) {
          const int c0 = r * span + lane * VEC;
          if (c0 >= D) continue;
          // Reloaded per point (an L1 hit) rather than held in registers across the loop:
          // registers are what limits this kernel's occupancy.
          acc_t g[VEC];
          load_chunk<VEC>(grad_out_g + c0, g);
          AtomicSink<VEC, acc_t> sink{grad_value_nm + level_offset + c0, row_stride};
          sample_point_backward<VEC>(value_nm + level_offset + c0, row_stride, b, w, 1, 0, g, sink,
                                     g_attn, g_px, g_py);
        }
      }
      // Sum the lanes' channel parts; lane t (whose own point this is) writes the result.
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        if (offset < G) {
          g_attn += __shfl_xor_sync(kFullMask, g_attn, offset, G);
          g_px += __shfl_xor_sync(kFullMask, g_px, offset, G);
          g_py += __shfl_xor_sync(kFullMask, g_py, offset, G);
        }
      }
      if (active && lane == t) {
        const int64_t j = group * LP + first + t;
        grad_attn[j] = static_cast<loc_t>(g_attn);
        grad_loc[2 * j] = static_cast<loc_t>(g_px * static_cast<acc_t>(wd));
        grad_loc[2 * j + 1] = static_cast<loc_t>(g_py * static_cast<acc_t>(h));
      }
    }
  }
}

}  // namespace cuda_kernels
}  // namespace msda
}  // namespace detrkit

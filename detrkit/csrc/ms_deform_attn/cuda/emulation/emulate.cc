// C entry points that run the CUDA kernels of ../kernels.cuh under the CPU emulation, for the
// tests (loaded with ctypes; built by the test with the host compiler, not by setup.py).
//
// Each entry takes raw contiguous buffers laid out like the operator's arguments, picks the
// vector width and group size the real launcher would (or the forced `vec`), launches with the
// real block size and returns the group size used, or -1 if the forced width does not fit.
#include "ms_deform_attn/cuda/emulation/cuda_emulation.h"

#include <c10/util/BFloat16.h>

#include "ms_deform_attn/cuda/kernels.cuh"

namespace {

using detrkit::msda::AccType;
using namespace detrkit::msda::cuda_kernels;

struct Shape {
  int64_t N, S, M, D, Lq, L, P;
};

template <typename scalar_t, typename F>
int with_vec(int forced, int64_t D, const void* a, const void* b, F&& f) {
  const int vec = forced > 0 ? forced : pick_vec(D, sizeof(scalar_t), {a, b});
  if (D % vec != 0 || vec * sizeof(scalar_t) > 16) return -1;
  switch (vec) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      if constexpr (4 * sizeof(scalar_t) <= 16) return f(std::integral_constant<int, 4>{});
      return -1;
    case 8:
      if constexpr (8 * sizeof(scalar_t) <= 16) return f(std::integral_constant<int, 8>{});
      return -1;
    default:
      return -1;
  }
}

unsigned blocks_for(const Shape& s, int G) {
  const int64_t groups = s.N * s.Lq * s.M;
  return static_cast<unsigned>((groups * G + kBlock - 1) / kBlock);
}

template <typename scalar_t, typename loc_t>
int forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const loc_t* loc,
            const loc_t* attn, scalar_t* out, Shape s, int forced_vec) {
  return with_vec<scalar_t>(forced_vec, s.D, value, out, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    const int G = pick_group(s.D, VEC);
    msda_emulation::launch(blocks_for(s, G), kBlock, s.L * 16, [&] {
      forward_kernel<scalar_t, loc_t, VEC>(value, shapes, starts, loc, attn, out, s.N * s.Lq * s.M,
                                           s.Lq, static_cast<int>(s.M), static_cast<int>(s.D), s.S,
                                           static_cast<int>(s.L), static_cast<int>(s.P), G);
    });
    return G;
  });
}

template <typename scalar_t, typename loc_t>
int backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
             const int64_t* starts, const loc_t* loc, const loc_t* attn,
             typename AccType<scalar_t>::type* grad_value, loc_t* grad_loc, loc_t* grad_attn,
             Shape s, int forced_vec) {
  return with_vec<scalar_t>(forced_vec, s.D, value, grad_out, [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    const int G = pick_group(s.D, VEC);
    msda_emulation::launch(blocks_for(s, G), kBlock, s.L * 16, [&] {
      backward_kernel<scalar_t, loc_t, VEC>(grad_out, value, shapes, starts, loc, attn, grad_value,
                                            grad_loc, grad_attn, s.N * s.Lq * s.M, s.Lq,
                                            static_cast<int>(s.M), static_cast<int>(s.D), s.S,
                                            static_cast<int>(s.L), static_cast<int>(s.P), G);
    });
    return G;
  });
}

}  // namespace

#define MSDA_EMULATED_ENTRIES(SUFFIX, SCALAR, LOC)                                              \
  extern "C" int msda_emulated_forward_##SUFFIX(                                                \
      const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,         \
      const void* attn, void* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq,      \
      int64_t L, int64_t P, int forced_vec) {                                                   \
    return forward(static_cast<const SCALAR*>(value), shapes, starts,                           \
                   static_cast<const LOC*>(loc), static_cast<const LOC*>(attn),                 \
                   static_cast<SCALAR*>(out), Shape{N, S, M, D, Lq, L, P}, forced_vec);         \
  }                                                                                             \
  extern "C" int msda_emulated_backward_##SUFFIX(                                               \
      const void* grad_out, const void* value, const int64_t* shapes, const int64_t* starts,    \
      const void* loc, const void* attn, void* grad_value, void* grad_loc, void* grad_attn,     \
      int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P,             \
      int forced_vec) {                                                                         \
    return backward(static_cast<const SCALAR*>(grad_out), static_cast<const SCALAR*>(value),    \
                    shapes, starts, static_cast<const LOC*>(loc), static_cast<const LOC*>(attn), \
                    static_cast<AccType<SCALAR>::type*>(grad_value), static_cast<LOC*>(grad_loc), \
                    static_cast<LOC*>(grad_attn), Shape{N, S, M, D, Lq, L, P}, forced_vec);     \
  }

MSDA_EMULATED_ENTRIES(f32, float, float)
MSDA_EMULATED_ENTRIES(f64, double, double)
MSDA_EMULATED_ENTRIES(bf16_f32, c10::BFloat16, float)

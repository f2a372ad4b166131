// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Everything here is written once and compiled as host code (CPU kernel) and as device code
// (CUDA kernel), so the CPU tests exercise the same bilinear sampling and its derivatives that
// the GPU runs. The kernels differ only in how they split the work and how they reduce.
//
// Conventions (docs/model.md, "Multi-scale deformable attention"; shapes in
// detrkit/layers/ms_deform_attn/op.py):
//   value            (N, S, M, D), D contiguous; a level starts at row `level_start` of S.
//   a location       normalized (x, y); pixel coordinate = loc * size - 0.5 (align_corners=False).
//   zero padding     a corner contributes only when it lies inside the (H, W) map.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
// The templates below call a caller-supplied sink that may be device-only (atomics); the
// instantiation decides, so silence nvcc's host/device cross-call check for them.
#define MSDA_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define MSDA_HD inline
#define MSDA_HD_TEMPLATE
#endif

// Marks a host channel loop whose iterations are independent. The compiler cannot prove it on
// its own where a loop reads and writes through several float pointers (value, grad_value and
// a local chunk), and then emits scalar code, which makes the CPU backward about 2x slower. Needs
// OpenMP's simd pragma (setup.py compiles with -fopenmp); a no-op on the device.
#if !defined(__CUDA_ARCH__) && defined(_OPENMP)
#define MSDA_SIMD _Pragma("omp simd")
#else
#define MSDA_SIMD
#endif

namespace detrkit {
namespace msda {

// Sizes of one call, read off the (already checked) arguments: batch N, value rows S, heads M,
// channels per head D, queries Lq, levels L, points per level P.
struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// Largest H, W and H * W of one level: corner rows y * W + x are int32 in the kernels.
constexpr int64_t kMaxLevelSize = int64_t{1} << 30;

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

MSDA_HD float floor_of(float x) { return floorf(x); }
MSDA_HD double floor_of(double x) { return floor(x); }

// The four corners of one bilinear sample. Corner k: 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0),
// 3 = (y1, x1), with x1 = x0 + 1 and y1 = y0 + 1.
template <typename acc_t>
struct Bilinear {
  int row[4];        // y * W + x inside the level (only meaningful where valid; H * W < 2^31)
  acc_t weight[4];   // bilinear weight of each corner
  bool valid[4];     // corner inside the map
  acc_t lx, ly;      // fractional parts of the pixel coordinate
};

// Sets up the sample at normalized (loc_x, loc_y) of an (h, w) map. Returns false when no corner
// can lie inside the map (then the sample reads zero and has zero gradient everywhere); NaN
// locations also return false. A pixel coordinate of exactly -1 still has its x1/y1 corner inside
// (with weight 0 but a nonzero derivative), which is what grid_sample does.
template <typename acc_t>
MSDA_HD bool bilinear_setup(acc_t loc_x, acc_t loc_y, int h, int w, Bilinear<acc_t>& b) {
  const acc_t px = loc_x * static_cast<acc_t>(w) - static_cast<acc_t>(0.5);
  const acc_t py = loc_y * static_cast<acc_t>(h) - static_cast<acc_t>(0.5);
  if (!(px >= static_cast<acc_t>(-1) && px < static_cast<acc_t>(w) &&
        py >= static_cast<acc_t>(-1) && py < static_cast<acc_t>(h))) {
    return false;
  }
  const acc_t fx = floor_of(px);
  const acc_t fy = floor_of(py);
  const int x0 = static_cast<int>(fx);
  const int y0 = static_cast<int>(fy);
  const int x1 = x0 + 1;
  const int y1 = y0 + 1;
  b.lx = px - fx;
  b.ly = py - fy;
  const acc_t hx = static_cast<acc_t>(1) - b.lx;
  const acc_t hy = static_cast<acc_t>(1) - b.ly;

  const bool x0_in = x0 >= 0;
  const bool x1_in = x1 <= w - 1;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y1 <= h - 1;
  b.valid[0] = y0_in && x0_in;
  b.valid[1] = y0_in && x1_in;
  b.valid[2] = y1_in && x0_in;
  b.valid[3] = y1_in && x1_in;
  b.weight[0] = hy * hx;
  b.weight[1] = hy * b.lx;
  b.weight[2] = b.ly * hx;
  b.weight[3] = b.ly * b.lx;
  const int r0 = y0 * w;
  const int r1 = r0 + w;
  b.row[0] = r0 + x0;
  b.row[1] = r0 + x1;
  b.row[2] = r1 + x0;
  b.row[3] = r1 + x1;
  return true;
}

// Reads NCH consecutive channels as acc_t. On the device, chunks of 4, 8 or 16 bytes are read
// with one vector load (the caller guarantees the alignment); elsewhere a plain loop, which the
// host compiler vectorizes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int NCH, typename scalar_t, typename acc_t>
MSDA_HD void load_chunk(const scalar_t* p, acc_t* out) {
#if defined(__CUDA_ARCH__)
  constexpr int kBytes = NCH * static_cast<int>(sizeof(scalar_t));
  constexpr bool kVectorLoad = kBytes == 4 || kBytes == 8 || kBytes == 16;
#else
  constexpr bool kVectorLoad = false;
#endif
  if constexpr (kVectorLoad) {
    const Pack<scalar_t, NCH> pk = *reinterpret_cast<const Pack<scalar_t, NCH>*>(p);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < NCH; ++c) out[c] = static_cast<acc_t>(pk.v[c]);
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < NCH; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
}

// Forward of one sampling point over a set of channels:
//   acc[c] += attn * sum_k weight_k * value[corner_k, c]
// `base` points at the first channel of the level's first row for this (n, m); consecutive
// rows are `row_stride` elements apart (M * D). The channels are `nchunks` chunks of NCH,
// chunk i starting at channel offset i * chunk_stride, accumulated into acc[i * NCH + c].
template <int NCH, typename scalar_t, typename acc_t>
MSDA_HD void sample_point_forward(const scalar_t* base, int64_t row_stride, const Bilinear<acc_t>& b,
                                  acc_t attn, int nchunks, int chunk_stride, acc_t* acc) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    if (!b.valid[k]) continue;
    const scalar_t* row = base + static_cast<int64_t>(b.row[k]) * row_stride;
    const acc_t cw = attn * b.weight[k];
    for (int i = 0; i < nchunks; ++i) {
      const scalar_t* src = row + static_cast<int64_t>(i) * chunk_stride;
      acc_t* a = acc + i * NCH;
#if defined(__CUDA_ARCH__)
      acc_t v[NCH];
      load_chunk<NCH>(src, v);
#pragma unroll
      for (int c = 0; c < NCH; ++c) a[c] += cw * v[c];
#else
      // Straight from memory: a staging copy would be spilled to the stack by the host compiler.
      for (int c = 0; c < NCH; ++c) a[c] += cw * static_cast<acc_t>(src[c]);
#endif
    }
  }
}

// Sum of the NCH (a power of two) partial products by repeated halving: part[c] += part[c + h]
// for h = NCH/2, ..., 1. Every build runs the same additions in the same order (the AVX2 and
// AVX-512 loops give the same bits), and a vector unit does each halving as one shuffle and one
// add instead of NCH dependent scalar adds. One template per step, so that every trip count is
// a compile-time constant.
template <int H, typename acc_t>
MSDA_HD void add_upper_half(acc_t* part) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  MSDA_SIMD
  for (int c = 0; c < H; ++c) part[c] += part[c + H];
  if constexpr (H > 1) add_upper_half<H / 2>(part);
}
template <int NCH, typename acc_t>
MSDA_HD acc_t sum_by_halving(acc_t* part) {
  static_assert(NCH > 0 && (NCH & (NCH - 1)) == 0, "NCH must be a power of two");
  if constexpr (NCH > 1) add_upper_half<NCH / 2>(part);
  return part[0];
}

// Backward of one sampling point over the same set of channels as sample_point_forward, given
// grad_out (the output gradient of those channels, packed like `acc` above):
//   grad_value[corner_k, c] += attn * weight_k * grad_out[c]   (through sink(row, chunk, scale, g))
//   grad_attn += sum_k weight_k * dot_k
//   grad_px   += attn * d/dpx (sum_k weight_k * dot_k), likewise grad_py,
// where dot_k = sum_c grad_out[c] * value[corner_k, c] over these channels only; the caller
// reduces the partial sums over the remaining channels and scales the pixel derivatives by the
// map size to get location derivatives.
MSDA_HD_TEMPLATE
template <int NCH, typename scalar_t, typename acc_t, typename Sink>
MSDA_HD void sample_point_backward(const scalar_t* base, int64_t row_stride, const Bilinear<acc_t>& b,
                                   acc_t attn, int nchunks, int chunk_stride, const acc_t* grad_out,
                                   Sink& sink, acc_t& grad_attn, acc_t& grad_px, acc_t& grad_py) {
  acc_t dot[4] = {0, 0, 0, 0};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    if (!b.valid[k]) continue;
    const scalar_t* row = base + static_cast<int64_t>(b.row[k]) * row_stride;
    const acc_t scale = attn * b.weight[k];
    // Per-channel partial products first, summed at the end: keeps the channel loop free of a
    // serial reduction so the host compiler can vectorize it without reassociating.
    acc_t part[NCH];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < NCH; ++c) part[c] = 0;
    for (int i = 0; i < nchunks; ++i) {
      const scalar_t* src = row + static_cast<int64_t>(i) * chunk_stride;
      const acc_t* g = grad_out + i * NCH;
#if defined(__CUDA_ARCH__)
      acc_t v[NCH];
      load_chunk<NCH>(src, v);
#pragma unroll
      for (int c = 0; c < NCH; ++c) part[c] += g[c] * v[c];
#else
      MSDA_SIMD
      for (int c = 0; c < NCH; ++c) part[c] += g[c] * static_cast<acc_t>(src[c]);
#endif
      sink(b.row[k], i, scale, g);
    }
    dot[k] = sum_by_halving<NCH>(part);
  }
  const acc_t hx = static_cast<acc_t>(1) - b.lx;
  const acc_t hy = static_cast<acc_t>(1) - b.ly;
  grad_attn += b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] +
               b.weight[3] * dot[3];
  grad_px += attn * (hy * (dot[1] - dot[0]) + b.ly * (dot[3] - dot[2]));
  grad_py += attn * (hx * (dot[2] - dot[0]) + b.lx * (dot[3] - dot[1]));
}

}  // namespace msda
}  // namespace detrkit

// What the CPU kernel's forward (forward.cpp) and backward (backward.cpp) share: the level
// table, the channel-chunk dispatch, raw-pointer arguments, per-point setup and prefetching (isa.h
// picks among the loop builds). Forward and backward are separate translation units so that
// the extension's build compiles them in parallel.
//
// Forward: threads split the (n, q) pairs; each (n, q, m) accumulates its L * P bilinear samples
// over the D channels (contiguous in value) in acc_t, then writes the output row once.
// Backward: threads split the (n, m) pairs, so the grad_value slice value[n, :, m, :] a thread
// writes belongs to it alone (no atomics, and the result does not depend on the thread count);
// the location and weight gradients of each (n, q, m, l, p) are written by exactly one thread.
// The per-sample math is common.h, shared with the CUDA kernel.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ms_deform_attn/common.h"
#include "ms_deform_attn/cpu/isa.h"
#include "ms_deform_attn/ms_deform_attn.h"

namespace detrkit {
namespace msda {
namespace cpu {

struct Level {
  int h;
  int w;
  int64_t start;
};

inline std::vector<Level> read_levels(const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  std::vector<Level> levels(L);
  for (int64_t l = 0; l < L; ++l) {
    levels[l] = {static_cast<int>(shapes[2 * l]), static_cast<int>(shapes[2 * l + 1]), starts[l]};
  }
  return levels;
}

// Channels are processed in chunks of NCH, the largest power of two up to 32 dividing D, so the
// inner loops have a compile-time trip count the compiler unrolls and vectorizes.
template <typename F>
inline void dispatch_chunk(int64_t D, F&& f) {
  if (D % 32 == 0) {
    f(std::integral_constant<int, 32>{});
  } else if (D % 16 == 0) {
    f(std::integral_constant<int, 16>{});
  } else if (D % 8 == 0) {
    f(std::integral_constant<int, 8>{});
  } else if (D % 4 == 0) {
    f(std::integral_constant<int, 4>{});
  } else if (D % 2 == 0) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Raw pointers and sizes of one call.
template <typename scalar_t, typename loc_t>
struct Args {
  const scalar_t* grad_out;  // backward only
  const scalar_t* value;
  const Level* levels;
  const loc_t* loc;
  const loc_t* attn;
  scalar_t* out;        // forward: output; backward: grad_value
  loc_t* grad_loc;      // backward only
  loc_t* grad_attn;     // backward only
  Dims d;
};

// One point's sample geometry, computed once per (n, q, m) and reused for every channel chunk.
template <typename acc_t>
struct Point {
  Bilinear<acc_t> b;
  acc_t attn;
  bool inside;
};

template <typename acc_t, typename loc_t>
inline void setup_points(const loc_t* loc_g, const loc_t* attn_g, const Level* levels,
                         const Dims& d, Point<acc_t>* pts) {
  for (int64_t l = 0; l < d.L; ++l) {
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t j = l * d.P + p;
      Point<acc_t>& pt = pts[j];
      pt.attn = static_cast<acc_t>(attn_g[j]);
      pt.inside = bilinear_setup(static_cast<acc_t>(loc_g[2 * j]),
                                 static_cast<acc_t>(loc_g[2 * j + 1]), levels[l].h, levels[l].w,
                                 pt.b);
    }
  }
}

// Queries of one head are M groups apart in the location/weight arrays, a stride the hardware
// prefetcher does not follow across pages: ask for a later query's entries ahead of time.
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
#endif
}
template <typename loc_t>
inline void prefetch_group(const loc_t* loc_g, const loc_t* attn_g, int64_t LP) {
  prefetch_bytes(loc_g, LP * 2 * static_cast<int64_t>(sizeof(loc_t)));
  prefetch_bytes(attn_g, LP * static_cast<int64_t>(sizeof(loc_t)));
}
constexpr int64_t kPrefetchQueries = 4;

inline void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: the CPU kernel got value on ",
              value.device());
}

}  // namespace cpu
}  // namespace msda
}  // namespace detrkit

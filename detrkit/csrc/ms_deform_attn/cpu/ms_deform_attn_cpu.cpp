// C++ CPU kernel of multi-scale deformable attention, forward and backward.
//
// Forward: threads split the (n, q) pairs; each (n, q, m) accumulates its L * P bilinear samples
// over the D channels (contiguous in value) in acc_t, then writes the output row once.
// Backward: threads split the (n, m) pairs, so the grad_value slice value[n, :, m, :] a thread
// writes belongs to it alone (no atomics, and the result does not depend on the thread count);
// the location and weight gradients of each (n, q, m, l, p) are written by exactly one thread.
// The per-sample math is common.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/common.h"
#include "ms_deform_attn/ms_deform_attn.h"

namespace detrkit {
namespace msda {

namespace {

struct Level {
  int h;
  int w;
  int64_t start;
};

std::vector<Level> read_levels(const at::Tensor& spatial_shapes,
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
void dispatch_chunk(int64_t D, F&& f) {
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

// Forward of the work items [begin, end) of the (n, m, query block) space (see forward_kernel):
// every query's output row for head m, in chunks of NCH channels accumulated in a local array.
template <int NCH, typename scalar_t, typename loc_t>
inline void forward_range(int64_t begin, int64_t end, int64_t block, const Args<scalar_t, loc_t>& a) {
  using acc_t = typename AccType<scalar_t>::type;
  const Dims& d = a.d;
  const int64_t row_stride = d.M * d.D;
  const int64_t LP = d.L * d.P;
  const int64_t blocks_per_head = (d.Lq + block - 1) / block;
  std::vector<Point<acc_t>> pts(LP);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t nm = item / blocks_per_head;
    const int64_t n = nm / d.M;
    const int64_t m = nm % d.M;
    const int64_t q_begin = (item % blocks_per_head) * block;
    const int64_t q_end = std::min(q_begin + block, d.Lq);
    const scalar_t* value_nm = a.value + (n * d.S * d.M + m) * d.D;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t group = (n * d.Lq + q) * d.M + m;
      if (q + kPrefetchQueries < q_end) {
        const int64_t ahead = group + kPrefetchQueries * d.M;
        prefetch_group(a.loc + ahead * LP * 2, a.attn + ahead * LP, LP);
      }
      setup_points(a.loc + group * LP * 2, a.attn + group * LP, a.levels, d, pts.data());
      for (int64_t c0 = 0; c0 < d.D; c0 += NCH) {
        acc_t acc[NCH];
        for (int c = 0; c < NCH; ++c) acc[c] = 0;
        for (int64_t j = 0; j < LP; ++j) {
          const Point<acc_t>& pt = pts[j];
          if (!pt.inside) continue;
          const scalar_t* base = value_nm + a.levels[j / d.P].start * row_stride + c0;
          sample_point_forward<NCH>(base, row_stride, pt.b, pt.attn, 1, NCH, acc);
        }
        scalar_t* o = a.out + group * d.D + c0;
        for (int c = 0; c < NCH; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  }
}

// Adds scale * g to one row of the (n, m) grad_value slice; the slice is owned by one thread.
template <int NCH, typename acc_t>
struct RowSink {
  acc_t* base;         // first channel of the chunk in row 0 of the current level
  int64_t row_stride;  // elements between rows
  void operator()(int64_t row, int /*chunk*/, acc_t scale, const acc_t* g) const {
    acc_t* dst = base + row * row_stride;
    for (int c = 0; c < NCH; ++c) dst[c] += scale * g[c];
  }
};

// Backward of the (n, m) pairs [begin, end). float and double accumulate straight into
// grad_value; half types into a float copy of the slice, rounded once at the end.
template <int NCH, typename scalar_t, typename loc_t>
inline void backward_range(int64_t begin, int64_t end, const Args<scalar_t, loc_t>& a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  const Dims& d = a.d;
  const int64_t row_stride = d.M * d.D;
  const int64_t LP = d.L * d.P;
  std::vector<acc_t> slice(kDirect ? 0 : d.S * d.D);
  std::vector<Point<acc_t>> pts(LP);
  std::vector<acc_t> grad_attn(LP), grad_px(LP), grad_py(LP);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / d.M;
    const int64_t m = nm % d.M;
    const scalar_t* value_nm = a.value + (n * d.S * d.M + m) * d.D;
    acc_t* gv_nm;
    int64_t gv_stride;
    if constexpr (kDirect) {
      gv_nm = reinterpret_cast<acc_t*>(a.out) + (n * d.S * d.M + m) * d.D;
      gv_stride = row_stride;
    } else {
      std::fill(slice.begin(), slice.end(), static_cast<acc_t>(0));
      gv_nm = slice.data();
      gv_stride = d.D;
    }
    for (int64_t q = 0; q < d.Lq; ++q) {
      const int64_t group = (n * d.Lq + q) * d.M + m;
      if (q + kPrefetchQueries < d.Lq) {
        const int64_t ahead = group + kPrefetchQueries * d.M;
        prefetch_group(a.loc + ahead * LP * 2, a.attn + ahead * LP, LP);
        prefetch_bytes(a.grad_out + ahead * d.D, d.D * static_cast<int64_t>(sizeof(scalar_t)));
      }
      setup_points(a.loc + group * LP * 2, a.attn + group * LP, a.levels, d, pts.data());
      std::fill(grad_attn.begin(), grad_attn.end(), static_cast<acc_t>(0));
      std::fill(grad_px.begin(), grad_px.end(), static_cast<acc_t>(0));
      std::fill(grad_py.begin(), grad_py.end(), static_cast<acc_t>(0));
      for (int64_t c0 = 0; c0 < d.D; c0 += NCH) {
        acc_t g[NCH];
        load_chunk<NCH>(a.grad_out + group * d.D + c0, g);
        for (int64_t j = 0; j < LP; ++j) {
          const Point<acc_t>& pt = pts[j];
          if (!pt.inside) continue;
          const int64_t start = a.levels[j / d.P].start;
          RowSink<NCH, acc_t> sink{gv_nm + start * gv_stride + c0, gv_stride};
          sample_point_backward<NCH>(value_nm + start * row_stride + c0, row_stride, pt.b, pt.attn,
                                     1, NCH, g, sink, grad_attn[j], grad_px[j], grad_py[j]);
        }
      }
      loc_t* gloc_g = a.grad_loc + group * LP * 2;
      loc_t* gattn_g = a.grad_attn + group * LP;
      for (int64_t j = 0; j < LP; ++j) {
        const Level& lv = a.levels[j / d.P];
        gattn_g[j] = static_cast<loc_t>(grad_attn[j]);
        gloc_g[2 * j] = static_cast<loc_t>(grad_px[j] * static_cast<acc_t>(lv.w));
        gloc_g[2 * j + 1] = static_cast<loc_t>(grad_py[j] * static_cast<acc_t>(lv.h));
      }
    }
    if constexpr (!kDirect) {
      scalar_t* dst = a.out + (n * d.S * d.M + m) * d.D;
      for (int64_t s = 0; s < d.S; ++s) {
        for (int64_t c = 0; c < d.D; ++c) {
          dst[s * row_stride + c] = static_cast<scalar_t>(slice[s * d.D + c]);
        }
      }
    }
  }
}

// The same loops compiled for AVX2 + FMA and for AVX-512, picked at run time on CPUs that have
// them. `flatten` inlines everything they call, so the whole loop nest gets the wider
// instructions while the baseline build stays runnable on any x86-64 CPU. With D = 32 channels
// per head (Deformable DETR's) a sample's channels are two AVX-512 registers instead of four
// AVX2 ones.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define MSDA_HAVE_X86_VARIANTS 1
template <int NCH, typename scalar_t, typename loc_t>
__attribute__((target("avx2,fma"), flatten)) void forward_range_avx2(
    int64_t begin, int64_t end, int64_t block, const Args<scalar_t, loc_t>& a) {
  forward_range<NCH>(begin, end, block, a);
}
template <int NCH, typename scalar_t, typename loc_t>
__attribute__((target("avx2,fma"), flatten)) void backward_range_avx2(
    int64_t begin, int64_t end, const Args<scalar_t, loc_t>& a) {
  backward_range<NCH>(begin, end, a);
}
template <int NCH, typename scalar_t, typename loc_t>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten)) void
forward_range_avx512(int64_t begin, int64_t end, int64_t block, const Args<scalar_t, loc_t>& a) {
  forward_range<NCH>(begin, end, block, a);
}
template <int NCH, typename scalar_t, typename loc_t>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten)) void
backward_range_avx512(int64_t begin, int64_t end, const Args<scalar_t, loc_t>& a) {
  backward_range<NCH>(begin, end, a);
}

// The widest instruction set both the CPU and DETRKIT_MSDA_CPU_ISA allow: "baseline", "avx2"
// or "avx512" (default: the widest the CPU has). The tests use it to check every variant.
enum class Isa { kBaseline, kAvx2, kAvx512 };
Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
    const char* want = std::getenv("DETRKIT_MSDA_CPU_ISA");
    if (want == nullptr || *want == '\0') return best;
    const std::string w(want);
    TORCH_CHECK(w == "baseline" || w == "avx2" || w == "avx512", "DETRKIT_MSDA_CPU_ISA='", w,
                "' is not an instruction set of the CPU kernel; expected baseline, avx2 or avx512");
    const Isa asked = w == "baseline" ? Isa::kBaseline : w == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    return std::min(asked, best);
  }();
  return isa;
}

// Of one loop nest compiled three ways, the build cpu_isa() picks.
template <typename Fn>
Fn widest(Fn baseline, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    case Isa::kBaseline:
      break;
  }
  return baseline;
}
#else
#define MSDA_HAVE_X86_VARIANTS 0
#endif

template <int NCH, typename scalar_t, typename loc_t>
void forward_kernel(const Args<scalar_t, loc_t>& a) {
  const Dims& d = a.d;
  // Work items are (n, m, block of queries), head-major: one head's value maps (S * D
  // elements) are the working set of a run of items, small enough to stay in L2 while its
  // queries, whose samples cluster around their reference points, walk over them. OpenMP hands
  // each thread a contiguous run of items.
  const int64_t block = 256;
  const int64_t items = d.N * d.M * ((d.Lq + block - 1) / block);
  auto range = &forward_range<NCH, scalar_t, loc_t>;
#if MSDA_HAVE_X86_VARIANTS
  range = widest(range, &forward_range_avx2<NCH, scalar_t, loc_t>,
                 &forward_range_avx512<NCH, scalar_t, loc_t>);
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { range(begin, end, block, a); });
}

template <int NCH, typename scalar_t, typename loc_t>
void backward_kernel(const Args<scalar_t, loc_t>& a) {
  auto range = &backward_range<NCH, scalar_t, loc_t>;
#if MSDA_HAVE_X86_VARIANTS
  range = widest(range, &backward_range_avx2<NCH, scalar_t, loc_t>,
                 &backward_range_avx512<NCH, scalar_t, loc_t>);
#endif
  at::parallel_for(0, a.d.N * a.d.M, 1, [&](int64_t begin, int64_t end) { range(begin, end, a); });
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: the CPU kernel got value on ",
              value.device());
}

}  // namespace

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Dims d = check_forward_args(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
  check_cpu(value);
  check_level_data(spatial_shapes, level_start_index, d.S);
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index);
  dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward",
                  [&](auto value_tag, auto loc_tag) {
                    using scalar_t = typename decltype(value_tag)::type;
                    using loc_t = typename decltype(loc_tag)::type;
                    const Args<scalar_t, loc_t> args{
                        nullptr,
                        value.const_data_ptr<scalar_t>(),
                        levels.data(),
                        sampling_locations.const_data_ptr<loc_t>(),
                        attention_weights.const_data_ptr<loc_t>(),
                        out.mutable_data_ptr<scalar_t>(),
                        nullptr,
                        nullptr,
                        d};
                    dispatch_chunk(d.D, [&](auto chunk) {
                      forward_kernel<decltype(chunk)::value>(args);
                    });
                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = check_backward_args(grad_output, value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  check_cpu(value);
  check_level_data(spatial_shapes, level_start_index, d.S);
  at::Tensor grad_value = at::zeros_like(value);
  if (grad_output.numel() == 0 || sampling_locations.numel() == 0) {
    return {grad_value, at::zeros_like(sampling_locations), at::zeros_like(attention_weights)};
  }
  // Every element of these two is written by the kernel.
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index);
  dispatch_dtypes(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward",
      [&](auto value_tag, auto loc_tag) {
        using scalar_t = typename decltype(value_tag)::type;
        using loc_t = typename decltype(loc_tag)::type;
        const Args<scalar_t, loc_t> args{grad_output.const_data_ptr<scalar_t>(),
                                         value.const_data_ptr<scalar_t>(),
                                         levels.data(),
                                         sampling_locations.const_data_ptr<loc_t>(),
                                         attention_weights.const_data_ptr<loc_t>(),
                                         grad_value.mutable_data_ptr<scalar_t>(),
                                         grad_loc.mutable_data_ptr<loc_t>(),
                                         grad_attn.mutable_data_ptr<loc_t>(),
                                         d};
        dispatch_chunk(d.D, [&](auto chunk) { backward_kernel<decltype(chunk)::value>(args); });
      });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace detrkit

// Backward of the C++ CPU kernel of multi-scale deformable attention (kernel.h says how the
// work is split).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/cpu/kernel.h"

namespace detrkit {
namespace msda {
namespace cpu {
namespace {

// Adds scale * g to one row of the (n, m) grad_value slice; the slice is owned by one thread.
template <int NCH, typename acc_t>
struct RowSink {
  acc_t* base;         // first channel of the chunk in row 0 of the current level
  int64_t row_stride;  // elements between rows
  void operator()(int64_t row, int /*chunk*/, acc_t scale, const acc_t* g) const {
    acc_t* dst = base + row * row_stride;
    MSDA_SIMD
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

#if MSDA_HAVE_X86_VARIANTS
template <int NCH, typename scalar_t, typename loc_t>
MSDA_TARGET_AVX2 void backward_range_avx2(int64_t begin, int64_t end,
                                          const Args<scalar_t, loc_t>& a) {
  backward_range<NCH>(begin, end, a);
}
template <int NCH, typename scalar_t, typename loc_t>
MSDA_TARGET_AVX512 void backward_range_avx512(int64_t begin, int64_t end,
                                              const Args<scalar_t, loc_t>& a) {
  backward_range<NCH>(begin, end, a);
}
#endif

template <int NCH, typename scalar_t, typename loc_t>
void backward_kernel(const Args<scalar_t, loc_t>& a) {
  auto range = &backward_range<NCH, scalar_t, loc_t>;
#if MSDA_HAVE_X86_VARIANTS
  const Isa isa = cpu_isa();  // read (and DETRKIT_MSDA_CPU_ISA checked) for narrow chunks too
  if constexpr (NCH >= 8) {
    range = widest(isa, range, &backward_range_avx2<NCH, scalar_t, loc_t>,
                   &backward_range_avx512<NCH, scalar_t, loc_t>);
  }
#endif
  at::parallel_for(0, a.d.N * a.d.M, 1, [&](int64_t begin, int64_t end) { range(begin, end, a); });
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = check_backward_args(grad_output, value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
  cpu::check_cpu(value);
  check_level_data(spatial_shapes, level_start_index, d.S);
  at::Tensor grad_value = at::zeros_like(value);
  if (grad_output.numel() == 0 || sampling_locations.numel() == 0) {
    return {grad_value, at::zeros_like(sampling_locations), at::zeros_like(attention_weights)};
  }
  // Every element of these two is written by the kernel.
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const std::vector<cpu::Level> levels = cpu::read_levels(spatial_shapes, level_start_index);
  dispatch_dtypes(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward",
      [&](auto value_tag, auto loc_tag) {
        using scalar_t = typename decltype(value_tag)::type;
        using loc_t = typename decltype(loc_tag)::type;
        const cpu::Args<scalar_t, loc_t> args{grad_output.const_data_ptr<scalar_t>(),
                                         value.const_data_ptr<scalar_t>(),
                                         levels.data(),
                                         sampling_locations.const_data_ptr<loc_t>(),
                                         attention_weights.const_data_ptr<loc_t>(),
                                         grad_value.mutable_data_ptr<scalar_t>(),
                                         grad_loc.mutable_data_ptr<loc_t>(),
                                         grad_attn.mutable_data_ptr<loc_t>(),
                                         d};
        cpu::dispatch_chunk(d.D, [&](auto chunk) { cpu::backward_kernel<decltype(chunk)::value>(args); });
      });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace detrkit

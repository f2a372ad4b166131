// Forward of the C++ CPU kernel of multi-scale deformable attention (kernel.h says how the
// work is split).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn/cpu/kernel.h"

namespace detrkit {
namespace msda {
namespace cpu {
namespace {

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

#if MSDA_HAVE_X86_VARIANTS
template <int NCH, typename scalar_t, typename loc_t>
MSDA_TARGET_AVX2 void forward_range_avx2(int64_t begin, int64_t end, int64_t block,
                                         const Args<scalar_t, loc_t>& a) {
  forward_range<NCH>(begin, end, block, a);
}
template <int NCH, typename scalar_t, typename loc_t>
MSDA_TARGET_AVX512 void forward_range_avx512(int64_t begin, int64_t end, int64_t block,
                                             const Args<scalar_t, loc_t>& a) {
  forward_range<NCH>(begin, end, block, a);
}
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
  const Isa isa = cpu_isa();  // read (and DETRKIT_MSDA_CPU_ISA checked) for narrow chunks too
  if constexpr (NCH >= 8) {
    range = widest(isa, range, &forward_range_avx2<NCH, scalar_t, loc_t>,
                   &forward_range_avx512<NCH, scalar_t, loc_t>);
  }
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { range(begin, end, block, a); });
}

}  // namespace
}  // namespace cpu

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Dims d = check_forward_args(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
  cpu::check_cpu(value);
  check_level_data(spatial_shapes, level_start_index, d.S);
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  const std::vector<cpu::Level> levels = cpu::read_levels(spatial_shapes, level_start_index);
  dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward",
                  [&](auto value_tag, auto loc_tag) {
                    using scalar_t = typename decltype(value_tag)::type;
                    using loc_t = typename decltype(loc_tag)::type;
                    const cpu::Args<scalar_t, loc_t> args{
                        nullptr,
                        value.const_data_ptr<scalar_t>(),
                        levels.data(),
                        sampling_locations.const_data_ptr<loc_t>(),
                        attention_weights.const_data_ptr<loc_t>(),
                        out.mutable_data_ptr<scalar_t>(),
                        nullptr,
                        nullptr,
                        d};
                    cpu::dispatch_chunk(d.D, [&](auto chunk) {
                      cpu::forward_kernel<decltype(chunk)::value>(args);
                    });
                  });
  return out;
}

}  // namespace msda
}  // namespace detrkit

// Argument checks shared by the CPU and CUDA entry points. The public Python entry point
// (ms_deform_attn in detrkit/layers/ms_deform_attn/op.py) runs the same checks first, raising
// ValueError / TypeError; these are for callers of torch.ops.detrkit.* directly, so that a bad
// argument is a RuntimeError naming it and never an out-of-bounds read. The values of
// spatial_shapes / level_start_index are checked on the CPU only (check_level_data); the CUDA
// kernel does not read them back to the host and skips levels that fall outside value.
#include "ms_deform_attn/ms_deform_attn.h"

namespace detrkit {
namespace msda {

namespace {

bool is_half_like(at::ScalarType t) {
  return t == at::ScalarType::Half || t == at::ScalarType::BFloat16;
}

void check_dtype_rule(const at::Tensor& value, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights) {
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || is_half_like(vt),
              "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", vt);
  const auto lt = sampling_locations.scalar_type();
  TORCH_CHECK(lt == attention_weights.scalar_type(),
              "ms_deform_attn: sampling_locations (", lt, ") and attention_weights (",
              attention_weights.scalar_type(), ") must share one dtype");
  TORCH_CHECK(lt == vt || (lt == at::kFloat && is_half_like(vt)),
              "ms_deform_attn: sampling_locations/attention_weights dtype ", lt,
              " does not go with value dtype ", vt,
              "; accepted: the value's dtype, or float32 when value is float16/bfloat16");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name,
              " must be contiguous (call .contiguous() on it first)");
}

}  // namespace

Dims check_forward_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", L,
              " levels of spatial_shapes, got shape ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
         L, sampling_locations.size(4)};
  const auto loc = sampling_locations.sizes();
  TORCH_CHECK(loc[0] == d.N && loc[2] == d.M && loc[3] == d.L,
              "ms_deform_attn: sampling_locations shape ", loc, " does not match value (N=", d.N,
              ", M=", d.M, ") and spatial_shapes (L=", d.L, ")");
  const auto aw = attention_weights.sizes();
  TORCH_CHECK(aw[0] == d.N && aw[1] == d.Lq && aw[2] == d.M && aw[3] == d.L && aw[4] == d.P,
              "ms_deform_attn: attention_weights shape ", aw,
              " must equal sampling_locations shape without its last dim, ",
              sampling_locations.sizes().slice(0, 5));

  check_dtype_rule(value, sampling_locations, attention_weights);

  const auto device = value.device();
  TORCH_CHECK(sampling_locations.device() == device, "ms_deform_attn: sampling_locations is on ",
              sampling_locations.device(), " but value is on ", device);
  TORCH_CHECK(attention_weights.device() == device, "ms_deform_attn: attention_weights is on ",
              attention_weights.device(), " but value is on ", device);
  TORCH_CHECK(spatial_shapes.device() == device, "ms_deform_attn: spatial_shapes is on ",
              spatial_shapes.device(), " but value is on ", device);
  TORCH_CHECK(level_start_index.device() == device, "ms_deform_attn: level_start_index is on ",
              level_start_index.device(), " but value is on ", device);

  check_contiguous(value, "value");
  check_contiguous(spatial_shapes, "spatial_shapes");
  check_contiguous(level_start_index, "level_start_index");
  check_contiguous(sampling_locations, "sampling_locations");
  check_contiguous(attention_weights, "attention_weights");
  return d;
}

Dims check_backward_args(const at::Tensor& grad_output, const at::Tensor& value,
                         const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Dims d = check_forward_args(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == d.N &&
                  grad_output.size(1) == d.Lq && grad_output.size(2) == d.M * d.D,
              "ms_deform_attn backward: grad_output must be (N, Lq, M * D) = (", d.N, ", ", d.Lq,
              ", ", d.M * d.D, "), got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn backward: grad_output dtype ", grad_output.scalar_type(),
              " must equal value dtype ", value.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn backward: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
  check_contiguous(grad_output, "grad_output");
  return d;
}

void check_level_data(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      int64_t S) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = shapes[2 * l];
    const int64_t w = shapes[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0 && h <= kMaxLevelSize && w <= kMaxLevelSize &&
                    h * w <= kMaxLevelSize,
                "ms_deform_attn: spatial_shapes[", l, "] = (", h, ", ", w,
                ") must be positive sizes (H, W) with H * W <= 2^30");
    TORCH_CHECK(starts[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", starts[l],
                " but the levels before it hold ", total,
                " rows (level_start_index must be the running sum of H * W)");
    total += h * w;
  }
  TORCH_CHECK(total == S, "ms_deform_attn: spatial_shapes sum to ", total,
              " positions (sum of H * W) but value has S = ", S);
}

}  // namespace msda
}  // namespace detrkit

// The loop build the CPU kernel runs (isa.h), decided once per process from the CPU's
// features and DETRKIT_MSDA_CPU_ISA.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "ms_deform_attn/cpu/isa.h"

namespace detrkit {
namespace msda {
namespace cpu {

#if MSDA_HAVE_X86_VARIANTS
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
#endif

}  // namespace cpu
}  // namespace msda
}  // namespace detrkit

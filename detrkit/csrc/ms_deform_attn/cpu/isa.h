// Which build of the CPU kernel's loops runs (kernel.h): kept apart from the kernel so that
// isa.cpp compiles without ATen.
#pragma once

// The loops are compiled for any x86-64 CPU and again, through `target` attributes, for AVX2 +
// FMA and for AVX-512; the widest the CPU has runs. `flatten` inlines everything the wider
// builds call, so the whole loop nest gets the wider instructions while the baseline build
// stays runnable everywhere. With D = 32 channels per head (Deformable DETR's) a sample's
// channels are two AVX-512 registers instead of four AVX2 ones. Chunks of fewer than 8
// channels do not fill a vector register, so they have the baseline build only.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define MSDA_HAVE_X86_VARIANTS 1
#define MSDA_TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))
#define MSDA_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten))

namespace detrkit {
namespace msda {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest instruction set both the CPU and DETRKIT_MSDA_CPU_ISA allow: "baseline", "avx2"
// or "avx512" (default: the widest the CPU has), read once per process (isa.cpp). The tests
// use it to check every variant.
Isa cpu_isa();

// Of one loop nest compiled three ways, the build for `isa` (cpu_isa()).
template <typename Fn>
Fn widest(Isa isa, Fn baseline, Fn avx2, Fn avx512) {
  switch (isa) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    case Isa::kBaseline:
      break;
  }
  return baseline;
}

}  // namespace cpu
}  // namespace msda
}  // namespace detrkit
#else
#define MSDA_HAVE_X86_VARIANTS 0
#endif

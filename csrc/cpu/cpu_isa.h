// Which compiled ISA copy of the CPU inner loops may run. On x86-64 the loops are compiled once at
// the portable baseline and again under GG_TARGET_AVX2 / GG_TARGET_AVX512 (`#pragma GCC target`);
// each kernel file picks the widest copy this CPU supports. GRADGUARD_CPU_ISA=default|avx2 caps
// the choice, so the tests can run the copies this CPU would not pick.
//
// Elsewhere (aarch64: GH200, Graviton) neither the target pragmas nor __builtin_cpu_supports
// exist: the macros expand to nothing, the "avx2"/"avx512" copies are plain portable copies that
// are never picked, and the baseline copy runs (gcc auto-vectorizes it for the target's own
// baseline SIMD, NEON on aarch64). All the x86 knowledge stays in this header, so the kernel files
// carry one macro line per ISA copy.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define GG_CPU_X86 1
#define GG_TARGET_AVX2 _Pragma("GCC target(\"avx2,fma,f16c\")")
#define GG_TARGET_AVX512 _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx2,fma,f16c\")")
#else
#define GG_CPU_X86 0
#define GG_TARGET_AVX2
#define GG_TARGET_AVX512
#endif

namespace gradguard {

inline bool cpu_isa_allowed(const char* isa) {
  const char* cap = std::getenv("GRADGUARD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  if (std::strcmp(cap, "default") == 0) return false;
  return std::strcmp(cap, "avx2") == 0 ? std::strcmp(isa, "avx2") == 0 : true;
}

inline bool cpu_has_avx2() {
#if GG_CPU_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && cpu_isa_allowed("avx2");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if GG_CPU_X86
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && cpu_isa_allowed("avx512");
  return has;
#else
  return false;
#endif
}

}  // namespace gradguard

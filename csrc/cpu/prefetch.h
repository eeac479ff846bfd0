// Software prefetch for the 512-bit loops (stats_zmm.h, scale_zmm.h), on Intel cores only: it was
// measured to help there (see the loops), and on AMD's Zen 4 a prefetch 4 KB ahead made the 256-bit
// stats loop slower (2026-12-05; the distances used here were not measured on AMD).
#pragma once

#include "cpu_isa.h"

#if GG_CPU_X86
#include <xmmintrin.h>

#include <cstdint>

namespace gradguard {

inline bool prefetch_helps() {
  static const bool on = __builtin_cpu_is("intel");
  return on;
}

// A line into L1 (T0) or into L2 (T1). An address, not a pointer: it may lie past the end of the
// tensor (a prefetch never faults).
inline void prefetch_l1(uintptr_t a) { _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0); }
inline void prefetch_l2(uintptr_t a) { _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1); }

}  // namespace gradguard
#endif

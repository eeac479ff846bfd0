// Which compiled ISA copy of the CPU inner loops may run. The loops are compiled once at the
// portable x86-64 baseline and again under `#pragma GCC target(...)`; each kernel file picks the
// widest copy this CPU supports. GRADGUARD_CPU_ISA=default|avx2 caps the choice, so the tests can
// run the copies this CPU would not pick.
#pragma once

#include <cstdlib>
#include <cstring>

namespace gradguard {

inline bool cpu_isa_allowed(const char* isa) {
  const char* cap = std::getenv("GRADGUARD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  if (std::strcmp(cap, "default") == 0) return false;
  return std::strcmp(cap, "avx2") == 0 ? std::strcmp(isa, "avx2") == 0 : true;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_isa_allowed("avx2");
  return has;
}

inline bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && cpu_isa_allowed("avx512");
  return has;
}

}  // namespace gradguard

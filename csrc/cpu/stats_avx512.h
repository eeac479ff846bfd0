// The AVX-512 hot loop of the statistics kernel for float32/float16/bfloat16 with p = 1, 2 or inf:
// 32 elements per step, widened to float, then to double (vcvtps2pd), squared and summed with FMAs
// into eight independent double accumulators. Written with intrinsics because gcc's
// auto-vectorizer, given the same loop in C++, neither converts float16 with vcvtph2ps nor keeps
// the float->double widening in registers: that left the loop compute-bound at 2-4x the read
// floor's time (README "Measured (CPU)"). Every square is still formed and summed in double, so
// the README's "accumulated in float64" holds.
//
// Only the AVX-512 copy of stats_loops.inc calls this; on other targets the header is empty.
#pragma once

#include "cpu_isa.h"

#if GG_CPU_X86
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#pragma GCC push_options
GG_TARGET_AVX512
namespace gradguard {
namespace avx512 {

template <bool kSquares>
inline __m256d accumulate(__m256d s, __m256d d) {
  if (kSquares) return _mm256_fmadd_pd(d, d, s);
  return _mm256_add_pd(s, _mm256_andnot_pd(_mm256_set1_pd(-0.0), d));
}

// 32 elements into 8 independent double accumulators (FMA latency x throughput). Measured on
// cache-resident float32 (one thread, this project's Zen 4 VM): converting 4 floats straight from
// memory with 256-bit vcvtps2pd ran 15.9 G elements/s, the 512-bit form with an extract 11.6.
template <bool kSquares>
inline void step32(const float* x, __m256d* s) {
  for (int k = 0; k < 8; ++k) s[k] = accumulate<kSquares>(s[k], _mm256_cvtps_pd(_mm_loadu_ps(x + 4 * k)));
}

template <bool kSquares>
inline void step32_of8(__m256 f, __m256d* s) {
  s[0] = accumulate<kSquares>(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  s[1] = accumulate<kSquares>(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
}

template <bool kSquares>
inline void step32(const c10::Half* x, __m256d* s) {
  for (int k = 0; k < 4; ++k) {
    step32_of8<kSquares>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * k))), s + 2 * k);
  }
}

// bfloat16 is the top half of a float32: widen each 16-bit word to 32 bits and shift it up.
template <bool kSquares>
inline void step32(const c10::BFloat16* x, __m256d* s) {
  for (int k = 0; k < 4; ++k) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * k)));
    step32_of8<kSquares>(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), s + 2 * k);
  }
}

// amax on the bit patterns with the sign cleared: for finite values the unsigned order of the
// patterns is the order of the magnitudes (NaN/Inf segments never use this amax: their sum is
// not finite), and 16-bit types take 32 elements per instruction.
inline __m512i amax32(const float* x, __m512i m) {
  const __m512i mag = _mm512_set1_epi32(0x7fffffff);
  m = _mm512_max_epu32(m, _mm512_and_si512(mag, _mm512_loadu_si512(x)));
  return _mm512_max_epu32(m, _mm512_and_si512(mag, _mm512_loadu_si512(x + 16)));
}

template <typename T>
inline __m512i amax32(const T* x, __m512i m) {
  return _mm512_max_epu16(m, _mm512_and_si512(_mm512_set1_epi16(0x7fff), _mm512_loadu_si512(x)));
}

inline float amax_value(__m512i m, const float*) {
  return _mm512_reduce_max_ps(_mm512_castsi512_ps(m));
}

template <typename T>
inline float amax_value(__m512i m, const T*) {
  alignas(64) uint16_t w[32];
  _mm512_store_si512(w, m);
  uint16_t top = 0;
  for (uint16_t v : w) top = v > top ? v : top;
  return static_cast<float>(T(top, T::from_bits()));
}

// sum = sum of x^2 (kSquares) or of |x|, in double; amax = max |x|. The caller asks for squares
// for p = inf too: a NaN or Inf element makes the sum non-finite, which is how it learns the
// segment needs the counting loop.
constexpr int64_t kPrefetch = 1024;

template <typename T, bool kSquares>
inline void sums(const T* x, int64_t n, double& sum, float& amax) {
  __m256d s[8];
  for (auto& v : s) v = _mm256_setzero_pd();
  __m512i m = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(x + j + kPrefetch), _MM_HINT_T0);
    if (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char*>(x + j + kPrefetch + 16), _MM_HINT_T0);
    step32<kSquares>(x + j, s);
    m = amax32(x + j, m);
  }
  double tail = 0.0;
  float mt = 0.f;
  for (; j < n; ++j) {
    const float a = std::abs(static_cast<float>(x[j]));
    const double d = static_cast<double>(a);
    tail += kSquares ? d * d : d;
    mt = a > mt ? a : mt;
  }
  const __m256d t = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3])),
                                  _mm256_add_pd(_mm256_add_pd(s[4], s[5]), _mm256_add_pd(s[6], s[7])));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, t);
  sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail;
  const float mv = j >= 32 ? amax_value(m, x) : 0.f;
  amax = mv > mt ? mv : mt;
}

}  // namespace avx512
}  // namespace gradguard
#pragma GCC pop_options
#endif

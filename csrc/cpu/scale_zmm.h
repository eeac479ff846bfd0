// The 512-bit loops of the scaling kernels (maybe_scale_, zero_nonfinite_and_scale_;
// scale_cpu.cpp), for CPUs with AVX-512. float16/bfloat16: simd16::scale's arithmetic
// (simd_avx2.h) at twice the width, bit for bit the same results (a float32 product rounded once
// to nearest even; a non-finite word zeroed first when kZero). What is left after the last
// 32-element step, and a bfloat16 row with a NaN scale (a whole row of NaN: rare), go through the
// 256-bit loop.
//
// Why: on an Intel Xeon with AVX-512 (2026-12-07, the dev VM of that day, one thread) the 256-bit
// loop rescaled bfloat16 at 24 GB/s and float16 at 18 from L2, against an in-place rewrite of 57,
// and over 256 MB at 1.7-2.1x the rewrite floor's time: compute-bound. Intel cores run 512-bit
// ops on two ports, the 256-bit conversions and inserts on one. This loop alone took 1.24-1.36x
// (maybe_scale_) and 1.46-1.54x (zeroing); with a prefetch into L1 2 KB ahead (prefetch.h: Intel
// only) 0.95-1.00x and 0.97-1.00x (two alternating runs each of 0, 512 B, 1 KB, 2 KB: 1.27-1.36x,
// 1.09-1.14x, 0.99-1.05x, 0.95-1.00x for maybe_scale_). The loops now prefetch into L2 4 KB ahead,
// as the stats loops do: on the same Xeon (second session of 2026-12-07, alternating builds,
// against the rewrite walk that prefetches into L2 4 KB ahead), the GPT-2-small list on two
// threads, bfloat16 maybe_scale_ / zeroing 1.26-1.30x / 1.27-1.31x with the L1 prefetch and
// 1.09-1.12x / 1.11-1.14x with this one, float32 1.03-1.07x / 1.08-1.11x and 1.00-1.03x /
// 1.02-1.05x; one thread over 256 MB, bfloat16 1.26x against 1.09-1.11x, float32 0.97-0.98x
// against 0.89-0.92x.
#pragma once

#include "cpu_isa.h"

#if GG_CPU_X86
#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "prefetch.h"
#include "simd_avx2.h"

#pragma GCC push_options
GG_TARGET_AVX512
namespace gradguard {
namespace simd16_512 {

constexpr int64_t kPrefetchBytes = 4096;

// The non-finite words of v (all exponent bits set: Inf and NaN) made +0.
template <bool kHalf>
inline __m512i zero_nonfinite_words(__m512i v) {
  const __m512i exponent = _mm512_set1_epi16(kHalf ? 0x7C00 : 0x7F80);
  const __mmask32 bad = _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, exponent), exponent);
  return _mm512_maskz_mov_epi16(static_cast<__mmask32>(~bad), v);
}

// simd16::round_bf16_high at 16 lanes: the high half of each lane is the float32 rounded to a
// bfloat16, to nearest even (no NaN fix-up: see simd16::scale for why the fast loop needs none).
inline __m512i round_bf16_high(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  return _mm512_add_epi32(
      u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF)));
}

// x[i] = (x[i] finite ? x[i] : 0) * s when kZero, else x[i] * s: in float32, rounded once, for
// n contiguous elements.
template <bool kHalf, bool kZero>
inline void scale(uint16_t* x, int64_t n, float s) {
  if (!kHalf && s != s) return simd16::scale<kHalf, kZero>(x, n, s);
  const __m512 sv = _mm512_set1_ps(s);
  const bool pf = prefetch_helps();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;  // one 64-byte line a step
  int64_t i = 0;
  if constexpr (kHalf) {
    for (; i + 32 <= n; i += 32) {
      if (pf) prefetch_l2(ahead + 2 * i);
      __m512i v = _mm512_loadu_si512(x + i);
      if (kZero) v = zero_nonfinite_words<true>(v);
      const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
      const __m512 b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
      const __m256i lo = _mm512_cvtps_ph(_mm512_mul_ps(a, sv), _MM_FROUND_TO_NEAREST_INT);
      const __m256i hi = _mm512_cvtps_ph(_mm512_mul_ps(b, sv), _MM_FROUND_TO_NEAREST_INT);
      _mm512_storeu_si512(x + i, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    }
  } else {
    // The even and odd words widened by a shift and a mask (the 32-bit lanes' low and high
    // halves), rounded in place, and blended back in their own order.
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (; i + 32 <= n; i += 32) {
      if (pf) prefetch_l2(ahead + 2 * i);
      __m512i v = _mm512_loadu_si512(x + i);
      if (kZero) v = zero_nonfinite_words<false>(v);
      const __m512i even = round_bf16_high(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), sv));
      const __m512i odd = round_bf16_high(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), sv));
      _mm512_storeu_si512(x + i, _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(even, 16), odd));
    }
  }
  if (i < n) simd16::scale<kHalf, kZero>(x + i, n - i, s);
}

}  // namespace simd16_512

namespace simdf_512 {

using simd16_512::kPrefetchBytes;

// simdf::scale (simd_avx2.h) at 512 bits with the prefetch: x[i] = (x[i] finite ? x[i] : 0) * s
// when kZero, else x[i] * s, for n contiguous float32/float64 elements, bit for bit the same.
// (zero_nonfinite_and_scale_'s float32 rows took 1.06-1.18x the rewrite floor on the 256-bit loop
// over the GPT-2-small list, this day's Intel Xeon.)
template <bool kZero, typename T>
inline void scale(T* x, int64_t n, T s) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  constexpr int64_t kLanes = 64 / sizeof(T);
  const bool pf = prefetch_helps();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;  // one 64-byte line a step
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const __m512 sv = _mm512_set1_ps(s), big = _mm512_set1_ps(std::numeric_limits<float>::max());
    for (; i + kLanes <= n; i += kLanes) {
      if (pf) prefetch_l2(ahead + sizeof(T) * i);
      __m512 v = _mm512_loadu_ps(x + i);
      // |v| <= max is false for NaN and +-inf: zeroed, then scaled (-0.0 for a negative scale).
      if (kZero) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(v), big, _CMP_LE_OQ), v);
      _mm512_storeu_ps(x + i, _mm512_mul_ps(v, sv));
    }
  } else {
    const __m512d sv = _mm512_set1_pd(s), big = _mm512_set1_pd(std::numeric_limits<double>::max());
    for (; i + kLanes <= n; i += kLanes) {
      if (pf) prefetch_l2(ahead + sizeof(T) * i);
      __m512d v = _mm512_loadu_pd(x + i);
      if (kZero) v = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(_mm512_abs_pd(v), big, _CMP_LE_OQ), v);
      _mm512_storeu_pd(x + i, _mm512_mul_pd(v, sv));
    }
  }
  if (i < n) simdf::scale<kZero>(x + i, n - i, s);
}

}  // namespace simdf_512
}  // namespace gradguard
#pragma GCC pop_options
#endif

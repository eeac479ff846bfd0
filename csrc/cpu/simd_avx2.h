// AVX2+F16C loops over contiguous rows that gcc 12 compiles poorly from C++.
//
// simdf: float32/float64. The safe math forward's last pass over a block (write math(bound)
// where the input is beyond the bound, counting those elements): with the count, gcc's
// vectorized loop kept its accumulators on the stack, and the forward with out= took 1.24-1.29x
// the bare op. zero_nonfinite_and_scale_'s row: the portable copy (SSE2) ran at 1.25-1.30x the
// in-place floor, this at 1.01-1.09x (GPT-2-small list, alternating processes).
//
// simd16: contiguous float16/bfloat16 rows, for the passes that compare or rewrite 16-bit
// elements: the safe math forward's clamp and overwrite and safe_div's rows
// (safe_math_cpu.cpp), zero_nonfinite_and_scale_ and maybe_scale_ (scale_cpu.cpp). From C++, gcc 12 converts
// c10::Half by its bit-twiddling path (`__F16C__` is not defined inside a `#pragma GCC target`
// region, which the header does not see), and compiles a data-dependent select of 16-bit structs
// to a branch, mispredicted where the elements beyond the bound are scattered: with half of them
// beyond, the scalar clamp took 3-4x torch's whole clamp + log, and the scalar zero-and-scale 11x
// nan_to_num_ + mul_ (measured); torch's own bfloat16 multiply (maybe_scale_ used _foreach_mul_)
// ran at 1.6x the in-place floor.
//
// Results are bit-identical to the scalar loops and to torch's multiply for every number:
// comparisons in float32 (exact for both formats), a selected element copied bit for bit, a
// float32 result rounded to nearest even as c10's conversions do. A NaN stays a NaN; its bits
// may differ: bfloat16 NaN becomes 0x7FC0 (c10::BFloat16's rule; torch's vectorized multiply
// makes 0xFFFF, its scalar tail 0x7FC0), float16 keeps its quieted payload (as torch's
// vectorized multiply does; c10's scalar conversion makes 0x7E00).
//
// Compiled for AVX2+FMA+F16C only; callers check cpu_has_avx2() first. On other targets the
// header is empty and the portable loops run.
#pragma once

#include "cpu_isa.h"

#if GG_CPU_X86
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#pragma GCC push_options
GG_TARGET_AVX2
namespace gradguard {
namespace simd16 {

// 16 elements to two vectors of 8 floats. float16: elements 0-7 and 8-15. bfloat16 (the top
// half of a float32): zero words interleaved below each element, which takes elements 0-3, 8-11
// and 4-7, 12-15 (the unpacks work within 128-bit lanes); narrow_mask()/narrow_values() undo
// either order.
template <bool kHalf>
inline void widen(__m256i v, __m256& a, __m256& b) {
  if (kHalf) {
    a = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    b = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  } else {
    const __m256i zero = _mm256_setzero_si256();
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
  }
}

// Two compare masks (lanes 0 or -1) back to 16 16-bit lanes in widen()'s element order. The
// packs work within 128-bit lanes: for bfloat16 that is widen()'s own order; for float16 the
// middle 64-bit quarters are swapped back.
template <bool kHalf>
inline __m256i narrow_mask(__m256 a, __m256 b) {
  const __m256i packed = _mm256_packs_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b));
  return kHalf ? _mm256_permute4x64_epi64(packed, 0xD8) : packed;
}

// float32 -> bfloat16 bits, rounded to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule).
inline __m256i bf16_bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
}

template <bool kHalf>
inline __m256i narrow_values(__m256 a, __m256 b) {
  if (kHalf) {
    return _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  // Lanes hold 0..0xFFFF: the unsigned pack keeps them, in widen()'s order.
  return _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
}

template <bool kHalf>
inline float to_float(uint16_t bits) {
  if (kHalf) return _cvtsh_ss(bits);
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <bool kHalf>
inline uint16_t from_float(float f) {
  if (kHalf) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFF) >> 16);
}

// dst[i] = x[i] beyond `bound` (below it when kMin, above it otherwise) ? value : src[i], for n
// contiguous elements (src may be dst; x is not written). NaN is never beyond. Returns how many
// elements were.
template <bool kHalf, bool kMin>
inline int64_t select_beyond(uint16_t* dst, const uint16_t* src, const uint16_t* x, int64_t n, float bound,
                             uint16_t value) {
  const __m256 bv = _mm256_set1_ps(bound);
  const __m256i vv = _mm256_set1_epi16(static_cast<short>(value));
  int64_t count = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a, b;
    widen<kHalf>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), a, b);
    // Ordered compares: false for NaN.
    const __m256 ma = kMin ? _mm256_cmp_ps(a, bv, _CMP_LT_OQ) : _mm256_cmp_ps(a, bv, _CMP_GT_OQ);
    const __m256 mb = kMin ? _mm256_cmp_ps(b, bv, _CMP_LT_OQ) : _mm256_cmp_ps(b, bv, _CMP_GT_OQ);
    const __m256i m = narrow_mask<kHalf>(ma, mb);
    count += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(m))) / 2;  // 2 mask bytes a lane
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_blendv_epi8(s, vv, m));
  }
  for (; i < n; ++i) {
    const float f = to_float<kHalf>(x[i]);
    const bool beyond = kMin ? f < bound : f > bound;
    count += beyond;
    dst[i] = beyond ? value : src[i];
  }
  return count;
}

// The non-finite words of v (all exponent bits set: Inf and NaN) made +0: on the 16-bit words,
// three instructions for 16 elements (a float32 compare per 8 took six).
template <bool kHalf>
inline __m256i zero_nonfinite_words(__m256i v) {
  const __m256i exponent = _mm256_set1_epi16(kHalf ? 0x7C00 : 0x7F80);
  return _mm256_andnot_si256(_mm256_cmpeq_epi16(_mm256_and_si256(v, exponent), exponent), v);
}

// float32 bits + 0x7FFF + the lowest kept bit: the high half is then the bfloat16 rounded to
// nearest even (c10's rule), for any float whose low half cannot carry out of a NaN (see below).
inline __m256i round_bf16_high(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  return _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                               _mm256_set1_epi32(0x7FFF)));
}

// x[i] = (x[i] finite ? x[i] : 0) * s when kZero, else x[i] * s: in float32, rounded once, for
// n contiguous elements.
// bfloat16 with a scale that is not NaN takes a shorter loop (13.0 -> 18.5 GB/s zeroing, 16.8 ->
// 22.6 multiplying, from L1, one thread, the Zen 3 VM, where the in-place floor needs ~14 a thread
// of two; the integer zeroing alone took float16's from 13.9 to 15.2): the even and odd words
// widen by a shift and a mask (the 32-bit lanes' low and high halves), round in place and blend
// back in their own order, with no NaN fix-up: a NaN product there is a quieted bfloat16 NaN or
// inf * 0's default NaN, both with a zero low half, which the rounding add cannot carry out of,
// so it stays a NaN (its payload is the input's, quieted, not 0x7FC0). A NaN scale (any payload)
// takes the loop with the fix-up.
template <bool kHalf, bool kZero>
inline void scale(uint16_t* x, int64_t n, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  if (!kHalf && s == s) {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (; i + 16 <= n; i += 16) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      if (kZero) v = zero_nonfinite_words<false>(v);
      const __m256i even = round_bf16_high(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), sv));
      const __m256i odd = round_bf16_high(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), sv));
      // Words 1, 3, 5, ... from odd's high halves; 0, 2, 4, ... from even's, shifted down.
      const __m256i words = _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xAA);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), words);
    }
  }
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    // Zeroed before the multiply, as nan_to_num_ + mul_: -0.0 for a negative scale.
    if (kZero) v = zero_nonfinite_words<kHalf>(v);
    __m256 a, b;
    widen<kHalf>(v, a, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i),
                        narrow_values<kHalf>(_mm256_mul_ps(a, sv), _mm256_mul_ps(b, sv)));
  }
  for (; i < n; ++i) {
    const float v = to_float<kHalf>(x[i]);
    x[i] = from_float<kHalf>((!kZero || std::abs(v) <= 3.40282347e38f ? v : 0.0f) * s);
  }
}

// v rounded to float16/bfloat16 and back: the composite's intermediates stored in a 16-bit tensor.
// NaN stays NaN (bfloat16's rounding add could carry out of a NaN's low half).
template <bool kHalf>
inline __m256 round_through(__m256 v) {
  if (kHalf) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  const __m256 r = _mm256_castsi256_ps(
      _mm256_and_si256(round_bf16_high(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// 16 elements of b from b + i: contiguous (kB1), or the one element a stride-0 (broadcast) b has.
template <bool kHalf, bool kB1>
inline void load_or_broadcast(const uint16_t* b, int64_t i, __m256 one, __m256& lo, __m256& hi) {
  if (kB1) {
    widen<kHalf>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)), lo, hi);
  } else {
    lo = hi = one;
  }
}

// safe_div's rows for float16/bfloat16 (safe_math_loops.inc's div_row, div_by_float_row and
// div_backward_row, whose c10 conversions gcc leaves scalar: 25x torch.div's time in float16):
// out and a contiguous, b contiguous (kB1) or one value for every element (b_value: a broadcast
// divisor's element, or the float32 number of a division by a number, as torch.div divides by it:
// a division, not a multiply by 1/b, which is 1 ulp off for some elements). Same float arithmetic
// and roundings as those rows; eps and fill come already rounded as the rows round them.
// out[i] = |b| <= eps and a is not NaN ? fill : a / b, in float32, rounded once.
template <bool kHalf, bool kB1>
inline void div_tensors(uint16_t* out, const uint16_t* a, const uint16_t* b, float b_value, int64_t n, float eps,
                        float fill) {
  const __m256 ev = _mm256_set1_ps(eps), fv = _mm256_set1_ps(fill), b0 = _mm256_set1_ps(b_value);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a_lo, a_hi, b_lo, b_hi;
    widen<kHalf>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)), a_lo, a_hi);
    load_or_broadcast<kHalf, kB1>(b, i, b0, b_lo, b_hi);
    const auto one = [&](__m256 av, __m256 bv) {
      const __m256 guard = _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(bv, abs_mask), ev, _CMP_LE_OQ),
                                         _mm256_cmp_ps(av, av, _CMP_ORD_Q));
      return _mm256_blendv_ps(_mm256_div_ps(av, bv), fv, guard);
    };
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), narrow_values<kHalf>(one(a_lo, b_lo), one(a_hi, b_hi)));
  }
  for (; i < n; ++i) {
    const float av = to_float<kHalf>(a[i]), bv = kB1 ? to_float<kHalf>(b[i]) : b_value;
    out[i] = std::abs(bv) <= eps && av == av ? from_float<kHalf>(fill) : from_float<kHalf>(av / bv);
  }
}

// ga[i] = |b| <= eps ? 0 : g / b; gb[i] = |b| <= eps ? 0 : -g * T(T(a / b) / b) (torch.div's
// formulas with the composite's roundings). g may be broadcast too (kG1 false): the gradient of
// a .sum() or .mean() comes expanded.
template <bool kHalf, bool kG1, bool kB1>
inline void div_backward_tensors(uint16_t* ga, uint16_t* gb, const uint16_t* g, const uint16_t* a, const uint16_t* b,
                                 int64_t n, float eps) {
  const __m256 ev = _mm256_set1_ps(eps), zero = _mm256_setzero_ps(), b0 = _mm256_set1_ps(to_float<kHalf>(b[0]));
  const __m256 g0 = _mm256_set1_ps(to_float<kHalf>(g[0]));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 g_lo, g_hi, a_lo, a_hi, b_lo, b_hi;
    load_or_broadcast<kHalf, kG1>(g, i, g0, g_lo, g_hi);
    widen<kHalf>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)), a_lo, a_hi);
    load_or_broadcast<kHalf, kB1>(b, i, b0, b_lo, b_hi);
    __m256 ga_v[2], gb_v[2];
    const __m256 gs[2] = {g_lo, g_hi}, as[2] = {a_lo, a_hi}, bs[2] = {b_lo, b_hi};
    for (int h = 0; h < 2; ++h) {
      const __m256 guard = _mm256_cmp_ps(_mm256_and_ps(bs[h], abs_mask), ev, _CMP_LE_OQ);
      const __m256 q1 = round_through<kHalf>(_mm256_div_ps(as[h], bs[h]));
      const __m256 q2 = round_through<kHalf>(_mm256_div_ps(q1, bs[h]));
      ga_v[h] = _mm256_blendv_ps(_mm256_div_ps(gs[h], bs[h]), zero, guard);
      gb_v[h] = _mm256_blendv_ps(_mm256_mul_ps(_mm256_xor_ps(gs[h], sign), q2), zero, guard);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ga + i), narrow_values<kHalf>(ga_v[0], ga_v[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(gb + i), narrow_values<kHalf>(gb_v[0], gb_v[1]));
  }
  for (; i < n; ++i) {
    const float gv = to_float<kHalf>(g[kG1 ? i : 0]), av = to_float<kHalf>(a[i]), bv = to_float<kHalf>(b[kB1 ? i : 0]);
    const bool guard = std::abs(bv) <= eps;
    const float q1 = to_float<kHalf>(from_float<kHalf>(av / bv));
    const float q2 = to_float<kHalf>(from_float<kHalf>(q1 / bv));
    ga[i] = from_float<kHalf>(guard ? 0.0f : gv / bv);
    gb[i] = from_float<kHalf>(guard ? 0.0f : -gv * q2);
  }
}

}  // namespace simd16

namespace simdf {

// out[i] = value where x[i] is beyond `bound` (below it when kMin, above it otherwise; NaN never
// is), out untouched elsewhere; returns how many were. A vector with nothing beyond is not
// stored to at all: a masked store with an empty mask still costs ~10 cycles on AMD's cores.
template <bool kMin, typename T>
inline int64_t overwrite_beyond(T* out, const T* x, int64_t n, T bound, T value) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  constexpr int kLanes = 32 / sizeof(T);
  constexpr int kCmp = kMin ? _CMP_LT_OQ : _CMP_GT_OQ;
  int64_t count = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const __m256 bv = _mm256_set1_ps(bound), vv = _mm256_set1_ps(value);
    for (; i + kLanes <= n; i += kLanes) {
      const __m256 m = _mm256_cmp_ps(_mm256_loadu_ps(x + i), bv, kCmp);
      const int bits = _mm256_movemask_ps(m);
      if (bits != 0) {
        count += __builtin_popcount(static_cast<unsigned>(bits));
        _mm256_maskstore_ps(out + i, _mm256_castps_si256(m), vv);
      }
    }
  } else {
    const __m256d bv = _mm256_set1_pd(bound), vv = _mm256_set1_pd(value);
    for (; i + kLanes <= n; i += kLanes) {
      const __m256d m = _mm256_cmp_pd(_mm256_loadu_pd(x + i), bv, kCmp);
      const int bits = _mm256_movemask_pd(m);
      if (bits != 0) {
        count += __builtin_popcount(static_cast<unsigned>(bits));
        _mm256_maskstore_pd(out + i, _mm256_castpd_si256(m), vv);
      }
    }
  }
  for (; i < n; ++i) {
    const bool beyond = kMin ? x[i] < bound : x[i] > bound;
    count += beyond;
    if (beyond) out[i] = value;
  }
  return count;
}

// x[i] = (x[i] finite ? x[i] : 0) * s when kZero, else x[i] * s, for n contiguous float32/float64
// elements.
template <bool kZero, typename T>
inline void scale(T* x, int64_t n, T s) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  constexpr int kLanes = 32 / sizeof(T);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const __m256 sv = _mm256_set1_ps(s), big = _mm256_set1_ps(std::numeric_limits<float>::max());
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; i + kLanes <= n; i += kLanes) {
      __m256 v = _mm256_loadu_ps(x + i);
      // |v| <= max is false for NaN and +-inf: zeroed, then scaled (-0.0 for a negative scale).
      if (kZero) v = _mm256_and_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), big, _CMP_LE_OQ), v);
      _mm256_storeu_ps(x + i, _mm256_mul_ps(v, sv));
    }
  } else {
    const __m256d sv = _mm256_set1_pd(s), big = _mm256_set1_pd(std::numeric_limits<double>::max());
    const __m256d sign = _mm256_set1_pd(-0.0);
    for (; i + kLanes <= n; i += kLanes) {
      __m256d v = _mm256_loadu_pd(x + i);
      if (kZero) v = _mm256_and_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, v), big, _CMP_LE_OQ), v);
      _mm256_storeu_pd(x + i, _mm256_mul_pd(v, sv));
    }
  }
  for (; i < n; ++i) x[i] = (!kZero || std::abs(x[i]) <= std::numeric_limits<T>::max() ? x[i] : T(0)) * s;
}

}  // namespace simdf
}  // namespace gradguard
#pragma GCC pop_options

#endif  // GG_CPU_X86

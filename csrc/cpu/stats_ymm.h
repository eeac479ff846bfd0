// The AVX2 hot loop of the statistics kernel for float32/float16/bfloat16 with p = 1, 2 or inf:
// 32 elements per step. float32 (and sums of |x|) are widened to double (vcvtps2pd), squared and
// summed with FMAs into eight independent double accumulators; float16/bfloat16 squares take the
// integer-built loops of squares16 below. Written with intrinsics because gcc's auto-vectorizer,
// given the same loop in C++, neither converts float16 with vcvtph2ps nor keeps the float->double
// widening in registers: that left the loop compute-bound at 2-4x the read floor's time (README
// "Measured (CPU)"). Every square is exact and summed in double, so the README's "accumulated in
// float64" holds.
//
// Compiled for AVX2+FMA+F16C only, so both the AVX2 and the AVX-512 copies of stats_loops.inc
// inline it (gcc inlines a callee whose ISA is a subset of the caller's); on other targets the
// header is empty.
#pragma once

#include "cpu_isa.h"

#if GG_CPU_X86
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#pragma GCC push_options
GG_TARGET_AVX2
namespace gradguard {
namespace simd {

template <bool kSquares>
inline __m256d accumulate(__m256d s, __m256d d) {
  if (kSquares) return _mm256_fmadd_pd(d, d, s);
  return _mm256_add_pd(s, _mm256_andnot_pd(_mm256_set1_pd(-0.0), d));
}

// 32 elements into 8 independent double accumulators (4 FMA latency x 2 per cycle), each fed
// by a 256-bit vcvtps2pd of 4 floats.
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

// bfloat16 is the top half of a float32: interleaving zero words below each 16-bit word makes
// the floats, 8 per instruction and no shift (a zero-extend plus a shift took two). The
// interleave takes the elements in another order (within 128-bit lanes), which a sum and a max
// do not mind.
template <bool kSquares>
inline void step32(const c10::BFloat16* x, __m256d* s) {
  const __m256i zero = _mm256_setzero_si256();
  for (int k = 0; k < 2; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * k));
    step32_of8<kSquares>(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), s + 4 * k);
    step32_of8<kSquares>(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), s + 4 * k + 2);
  }
}

// amax on the bit patterns with the sign cleared: for finite values the unsigned order of the
// patterns is the order of the magnitudes (NaN/Inf segments never use this amax: their sum is
// not finite), and 16-bit types take 16 elements per instruction. 256-bit AVX2 integer max, so
// the AVX2 copy runs this loop too (the loop is memory-bound; 512-bit max gains nothing).
inline __m256i amax32(const float* x, __m256i m) {
  const __m256i mag = _mm256_set1_epi32(0x7fffffff);
  for (int k = 0; k < 4; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * k));
    m = _mm256_max_epu32(m, _mm256_and_si256(mag, v));
  }
  return m;
}

template <typename T>
inline __m256i amax32(const T* x, __m256i m) {
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  for (int k = 0; k < 2; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * k));
    m = _mm256_max_epu16(m, _mm256_and_si256(mag, v));
  }
  return m;
}

inline float amax_value(__m256i m, const float*) {
  alignas(32) uint32_t w[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), m);
  uint32_t top = 0;
  for (uint32_t v : w) top = v > top ? v : top;
  float f;
  std::memcpy(&f, &top, sizeof f);
  return f;
}

inline uint16_t amax_bits(__m256i m) {
  alignas(32) uint16_t w[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), m);
  uint16_t top = 0;
  for (uint16_t v : w) top = v > top ? v : top;
  return top;
}

template <typename T>
inline float amax_value(__m256i m, const T*) {
  return static_cast<float>(T(amax_bits(m), T::from_bits()));
}

// 8 elements as 8 floats (an exact widening for every input type): the tail's step.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

inline __m256 load8(const c10::BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// The main loop for float16/bfloat16 squares, 32 elements a step, over the first n - n % 32.
// vcvtps2pd runs at one per cycle on Zen 3, and the 16-bit loop above needs one per 4 elements plus
// the unpacks that feed it: on 2026-12-06 (Zen 3, AVX2) it ran at 13 GB/s a thread from L1, below
// the memory's ~14, so the 2-thread stats pass took 1.47x (float16) / 1.55x (bfloat16) the read
// floor. These loops build the doubles from the bits instead, with integer ops:
// - bfloat16: masking a 64-bit lane's 4 words into place puts each word's exponent in a double's,
//   and or-ing in bits 60 and 61 adds 768 to it: d = |x| * 2^-128, and d * d = x^2 * 2^-256, exact
//   and normal, in one FMA; the caller scales the sum by 2^256. No double here is subnormal: an
//   earlier version made |x| * 2^-896, subnormal for a subnormal word, and a bfloat16 list of
//   subnormals took 60x a normal one's time on an Intel Xeon (2026-12-07; a microcode assist per
//   subnormal operand). A zero or subnormal word takes the leading 1 it lacks and comes out as a
//   square below 2^-252: the caller sums an all-zero segment as 0, and redoes a segment whose
//   amax is below 2^-60 (and not 0) with the exact loop.
// - float16: vcvtph2ps to float32, squared in float32, exactly (11-bit significands, and 65504^2
//   and (2^-24)^2 are normal floats); each square moved into a double lane's top half and shifted
//   down 3 bits is sq * 2^-896 exactly (squares are >= 0 and normal), summed with a plain add.
//   The caller scales the sum by 2^896 (exact: the lanes stay far above double's subnormals).
// Both give the sums of squaring in double (the same exact squares, summed in double), up to the
// order of the additions (four accumulators here, eight there). NaN/Inf make finite doubles here:
// the caller tests the amax bit pattern.
// Four accumulators, not eight: eight plus the temporaries spilled two to the stack, and the
// spilled chains set the pace (14 vs 21 GB/s from L1 for bfloat16).
inline void squares16(const c10::BFloat16* x, int64_t n, __m256d* s, __m256i& m) {
  const __m256i place = _mm256_set1_epi64x(0x7fffLL << 45);
  const __m256i exponent = _mm256_set1_epi64x(3LL << 60);
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int u = 0; u < 2; ++u) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16 * u));
      const __m256i w[4] = {_mm256_slli_epi64(v, 45), _mm256_slli_epi64(v, 29), _mm256_slli_epi64(v, 13),
                            _mm256_srli_epi64(v, 3)};
      for (int k = 0; k < 4; ++k) {
        const __m256d d = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(w[k], place), exponent));
        s[k % 2 + 2 * u] = _mm256_fmadd_pd(d, d, s[k % 2 + 2 * u]);
      }
      m = _mm256_max_epu16(m, _mm256_and_si256(v, mag));
    }
  }
}

inline __m256d add_square_bits(__m256d s, __m256 sq_pairs) {
  return _mm256_add_pd(s, _mm256_castsi256_pd(_mm256_srli_epi64(_mm256_castps_si256(sq_pairs), 3)));
}

inline void squares16(const c10::Half* x, int64_t n, __m256d* s, __m256i& m) {
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int u = 0; u < 2; ++u) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16 * u));
      const __m256 f[2] = {_mm256_cvtph_ps(_mm256_castsi256_si128(v)), _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1))};
      for (int k = 0; k < 2; ++k) {
        const __m256 sq = _mm256_mul_ps(f[k], f[k]);
        s[2 * u] = add_square_bits(s[2 * u], _mm256_unpacklo_ps(zero, sq));
        s[2 * u + 1] = add_square_bits(s[2 * u + 1], _mm256_unpackhi_ps(zero, sq));
      }
      m = _mm256_max_epu16(m, _mm256_and_si256(v, mag));
    }
  }
}

constexpr double squares16_scale(const c10::BFloat16*) { return 0x1p256; }
constexpr double squares16_scale(const c10::Half*) { return 0x1p896; }
constexpr uint16_t nonfinite_bits(const c10::BFloat16*) { return 0x7f80; }
constexpr uint16_t nonfinite_bits(const c10::Half*) { return 0x7c00; }
// bfloat16 2^-60 (exponent field 67): at or above it the zeros' and subnormals' error (< 2^-252 each, the
// sum >= 2^-120) is at most n x 2^-132 of the sum, 2^-116 for the longest segment (65536), far
// under its rounding; below it (and not 0) the exact loop runs.
constexpr bool needs_exact_loop(const c10::BFloat16*, uint16_t amax) { return amax != 0 && amax < (67 << 7); }
constexpr bool needs_exact_loop(const c10::Half*, uint16_t) { return false; }

inline double add_lanes(const __m256d* s, int count) {
  __m256d t = s[0];
  for (int k = 1; k < count; ++k) t = _mm256_add_pd(t, s[k]);
  // (lane 0 + lane 1) + (lane 2 + lane 3), in registers (through memory, a store and four loads).
  const __m256d pairs = _mm256_hadd_pd(t, t);  // [0+1, 0+1, 2+3, 2+3]
  return _mm_cvtsd_f64(_mm_add_sd(_mm256_castpd256_pd128(pairs), _mm256_extractf128_pd(pairs, 1)));
}

// The largest of the 8 lanes (each >= +0.0). With a NaN lane the result may be that NaN or not;
// sums() returns amax only for use with a finite sum, which no NaN lane allows.
inline float max_lanes(__m256 m) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// The squares of x[0, main) by the convert-and-FMA loop: float32 input, sums of |x|, and the
// bfloat16 segments squares16 cannot take.
template <typename T, bool kSquares>
inline void main_by_convert(const T* x, int64_t main, __m256d* s, __m256i& m) {
  for (int64_t j = 0; j + 32 <= main; j += 32) {
    step32<kSquares>(x + j, s);
    m = amax32(x + j, m);
  }
}

// sum = sum of x^2 (kSquares) or of |x|, in double; amax = max |x|. The caller asks for squares
// for p = inf too: a NaN or Inf element makes the sum non-finite, which is how it learns the
// segment needs the counting loop. No software prefetch: the hardware prefetchers follow this one
// sequential stream, and on 2026-12-05 (a Zen 4 VM, AVX-512 copy) prefetching 4 KB ahead made the
// loop slower: one thread over 256 MB 22-24 GB/s with it, 23-28 without; the GPT-2-small list on
// two threads 1.26x / 1.49x the read floor's time with it, 1.05x / 1.14x without (two runs each).
// kSumUsed false (p = inf): the sum only tells finite from not, so a bfloat16 segment below 2^-60
// is not summed again.
// kWiden: the widening loop only (the exact one; for the 512-bit loop's own second pass).
template <typename T, bool kSquares, bool kSumUsed = true, bool kWiden = false>
inline void sums(const T* x, int64_t n, double& sum, float& amax) {
  constexpr bool kBits = kSquares && !kWiden && !std::is_same<T, float>::value;
  __m256d s[8];
  __m256i m = _mm256_setzero_si256();
  const int64_t main = n - n % 32;
  double main_sum = 0.0;
  // Below 32 elements there is no main part, and its accumulators are left unset: zeroing them
  // (a 256-byte rep stos) was a quarter of this function's time on 1,000 16-element tensors.
  if (main > 0) {
    for (auto& v : s) v = _mm256_setzero_pd();
    if constexpr (kBits) {
      squares16(x, n, s, m);
      const uint16_t top = amax_bits(m);
      if (top >= nonfinite_bits(x)) {
        main_sum = std::numeric_limits<double>::quiet_NaN();
      } else if (top == 0) {
        main_sum = 0.0;  // all zeros (bfloat16's came out as tiny squares)
      } else if (kSumUsed && needs_exact_loop(x, top)) {
        for (auto& v : s) v = _mm256_setzero_pd();
        main_by_convert<T, true>(x, main, s, m);
        main_sum = add_lanes(s, 8);
      } else {
        main_sum = add_lanes(s, 4) * squares16_scale(x);
      }
    } else {
      main_by_convert<T, kSquares>(x, main, s, m);
    }
  }
  // The tail, 8 elements a step and the last few zero-padded (a masked load for float32; zeros
  // change neither the sum nor the max). A tensor of 16 elements is all tail: one element at a time
  // (a chain of dependent double adds) it cost ~18 ns, a fifth of a 1,000-tensor list's time.
  // NaN/Inf may leave mt wrong; their segment's sum is not finite, so it is not used.
  __m256d t[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256 mt = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t j = main;
  for (; j + 8 <= n; j += 8) {
    const __m256 f = load8(x + j);
    step32_of8<kSquares>(f, t);
    mt = _mm256_max_ps(mt, _mm256_andnot_ps(sign, f));
  }
  if (j < n) {
    __m256 f;
    if constexpr (std::is_same<T, float>::value) {
      // Lanes k < n - j loaded, the others +0.0f without reading memory: the zero pad, no copy.
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      f = _mm256_maskload_ps(x + j, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), lane));
    } else {
      alignas(32) unsigned char pad[32] = {};
      std::memcpy(pad, x + j, static_cast<size_t>(n - j) * sizeof(T));
      f = load8(reinterpret_cast<const T*>(pad));
    }
    step32_of8<kSquares>(f, t);
    mt = _mm256_max_ps(mt, _mm256_andnot_ps(sign, f));
  }
  const double tail_sum = add_lanes(t, 2);  // >= 0 or NaN: adding a +0.0 main sum changes no bit
  sum = main == 0 ? tail_sum : (kBits ? main_sum : add_lanes(s, 8)) + tail_sum;
  const float tail_top = max_lanes(mt);
  const float main_top = main > 0 ? amax_value(m, x) : 0.f;
  amax = tail_top > main_top ? tail_top : main_top;
}

}  // namespace simd
}  // namespace gradguard
#pragma GCC pop_options
#endif

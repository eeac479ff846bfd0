// The AVX2 hot loop of the statistics kernel for float32/float16/bfloat16 with p = 1, 2 or inf:
// 32 elements per step, widened to float, then to double (vcvtps2pd), squared and summed with FMAs
// into eight independent double accumulators. Written with intrinsics because gcc's
// auto-vectorizer, given the same loop in C++, neither converts float16 with vcvtph2ps nor keeps
// the float->double widening in registers: that left the loop compute-bound at 2-4x the read
// floor's time (README "Measured (CPU)"). Every square is still formed and summed in double, so
// the README's "accumulated in float64" holds.
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

template <typename T>
inline float amax_value(__m256i m, const T*) {
  alignas(32) uint16_t w[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), m);
  uint16_t top = 0;
  for (uint16_t v : w) top = v > top ? v : top;
  return static_cast<float>(T(top, T::from_bits()));
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

// sum = sum of x^2 (kSquares) or of |x|, in double; amax = max |x|. The caller asks for squares
// for p = inf too: a NaN or Inf element makes the sum non-finite, which is how it learns the
// segment needs the counting loop. No software prefetch: the hardware prefetchers follow this one
// sequential stream, and on 2026-12-05 (a Zen 4 VM, AVX-512 copy) prefetching 4 KB ahead made the
// loop slower: one thread over 256 MB 22-24 GB/s with it, 23-28 without; the GPT-2-small list on
// two threads 1.26x / 1.49x the read floor's time with it, 1.05x / 1.14x without (two runs each).
template <typename T, bool kSquares>
inline void sums(const T* x, int64_t n, double& sum, float& amax) {
  __m256d s[8];
  for (auto& v : s) v = _mm256_setzero_pd();
  __m256i m = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    step32<kSquares>(x + j, s);
    m = amax32(x + j, m);
  }
  // The tail, 8 elements a step and the last few through a zero-padded copy (zeros change
  // neither the sum nor the max). A tensor of 16 elements is all tail: one element at a time
  // (a chain of dependent double adds) it cost ~18 ns, a fifth of a 1,000-tensor list's time.
  // NaN/Inf may leave mt wrong; their segment's sum is not finite, so it is not used.
  __m256 mt = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (; j + 8 <= n; j += 8) {
    const __m256 f = load8(x + j);
    step32_of8<kSquares>(f, s);
    mt = _mm256_max_ps(mt, _mm256_andnot_ps(sign, f));
  }
  if (j < n) {
    alignas(32) unsigned char pad[32] = {};
    std::memcpy(pad, x + j, static_cast<size_t>(n - j) * sizeof(T));
    const __m256 f = load8(reinterpret_cast<const T*>(pad));
    step32_of8<kSquares>(f, s);
    mt = _mm256_max_ps(mt, _mm256_andnot_ps(sign, f));
  }
  const __m256d t = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3])),
                                  _mm256_add_pd(_mm256_add_pd(s[4], s[5]), _mm256_add_pd(s[6], s[7])));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, t);
  sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  alignas(32) float tl[8];
  _mm256_store_ps(tl, mt);
  float top = n >= 32 ? amax_value(m, x) : 0.f;
  for (float v : tl) top = v > top ? v : top;
  amax = top;
}

}  // namespace simd
}  // namespace gradguard
#pragma GCC pop_options
#endif

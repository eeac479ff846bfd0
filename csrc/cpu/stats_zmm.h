// The 512-bit hot loop of the statistics kernel (the AVX-512 copy): float32/float16/bfloat16 with
// p = 2 or inf, float32 with p = 1, and float64's raw sums (p = 1, 2, inf) inside the scaled
// blocks of stats_loops.inc. The float32/16-bit steps are the 256-bit loop's (stats_ymm.h) at
// twice the width; what is left after the last whole step goes through that loop, as do a whole
// segment shorter than one step and a 16-bit sum of |x| (p = 1, rare). float64 has no 256-bit
// loop: the other copies sum it in the auto-vectorized loop of scaled_fast (stats_loops.inc), and
// main_f64's tail is a scalar loop.
//
// Why a copy of its own: on an Intel Xeon with AVX-512 (2026-12-07, the dev VM of that day, one
// thread, 1 MB from cache) the 256-bit loop summed float32 at 26 GB/s, bfloat16 at 12 and
// float16 at 11, against a read of 66-92: compute-bound, so the 2-thread stats pass over the
// GPT-2-small list took 1.3x (float32), 2.6x (bfloat16) and 3.1x (float16) the read floor's
// time. Intel cores run 512-bit ops on two ports and the 256-bit unpacks and conversions of the
// 16-bit loops all wait for one (port 5).
//
// - float32: eight floats widened by one vcvtps2pd into a 512-bit register, squared and summed
//   by FMA into eight independent double accumulators.
// - float16/bfloat16: the squares' bits moved into double lanes by shifts and masks, not by the
//   256-bit loop's unpacks and conversions (see squares16). A NaN/Inf word makes a finite double
//   there: the amax bit pattern tells them, as in the 256-bit loop. (AVX512-FP16's vcvtph2pd,
//   one conversion straight to double, was tried for float16 on the same Xeon on 2026-12-07 and
//   was slower from cache, 8.3-8.5 GB/s against 11.5-15 for squares16, and no faster from memory.)
// - float64: eight doubles a load, squared by FMA (p = 2) or their |x| added (p = 1, inf) into
//   eight chains, amax by vmaxpd (main_f64).
// Every float32/16-bit square is exact in double and summed in double, so these give the 256-bit
// loop's sums up to the order of the additions (and bfloat16's zeros and subnormals, below
// 2^-252 each: see squares16). float64 squares round, as in the other copies' loop; the two
// orders of addition differ in the last bits (about 1e-15 relative).
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

#include "prefetch.h"
#include "stats_ymm.h"

#pragma GCC push_options
GG_TARGET_AVX512
namespace gradguard {
namespace simd512 {

constexpr int kAcc = 8;

// Software prefetch into L2 (prefetch.h), 4 KB ahead of the loads, on Intel cores: one prefetch
// just before the loads of each line, not the step's lines prefetched together at its top. That
// placement, on the Xeon of 2026-12-07 (second session, GPT-2-small list, two threads, against the
// fastest floor walk, alternating builds; float64 / float32 / bfloat16 / float16), took the stats
// pass from 1.37-1.40x / 0.98-0.99x / 1.52-1.58x / 1.71-1.82x to 1.16x / 0.99-1.04x / 1.28x /
// 1.26-1.29x (float64's "before" is main_f64 prefetching at the top of each step, no faster than
// the auto-vectorized loop it replaced: 1.21-1.38x); one thread over 256 MB of float64 went from
// 8.1-8.7 GB/s to 9.8-11.1 (the prefetching floor walk, which also prefetches line by line:
// 9.6-11.3). Chains (below) still paid with this placement: without it, one thread over 256 MB
// read float32 at 7.6-7.8 GB/s against 9.4-9.9 with it. The earlier figures, with
// the prefetches at the top of each step (the first session of 2026-12-07): on this day's
// Intel Xeon (2026-12-07, the GPT-2-small list, two threads, against the 1-stream read walk
// without a prefetch, alternating processes; float32 / bfloat16 / float16): without one
// 1.23-1.33x / 1.41-1.57x / 1.66-1.70x; into L1 1-2 KB ahead 1.10-1.24x / 1.15-1.29x / 1.31-1.40x;
// into L2 4 KB ahead 1.18-1.24x / 1.23-1.38x / 1.29-1.30x, and with the accumulators in memory
// as well (Chains, below: what runs) 1.05-1.11x / 1.14-1.20x / 1.21-1.31x. 8 KB ahead was no
// better than 4.
constexpr int64_t kPrefetchBytes = 4096;

// On Intel cores (kPaced) the loops also keep their eight accumulators in memory: each FMA's sum
// is stored and reloaded (an L1 round trip; the empty asm keeps the compiler from holding them in
// registers). That makes the loop slower from cache and faster from memory (numbers above; one
// thread over 256 MB of float32 12.0 against ~10 GB/s, from L2 27.6 against 31). It was found
// when a build that read its prefetch distance at run time, and whose accumulators gcc spilled,
// ran faster than the clean one; why the Xeon's memory pipeline prefers the slower loop was not
// worked out, so it is kept because it measured so, on Intel only. Measured again for the 16-bit
// loops on the same Xeon (2026-12-07, a later session, alternating builds): with their chains in
// registers they ran faster from L2 (one thread, 1 MB: bfloat16 17.8-21.2 against 16.3-17.5 GB/s,
// float16 15.8-18.6 against 13.4-13.8) and much slower from memory (GPT-2-small list, two threads:
// 1.83-2.14x the read floor against 1.33-1.54x; with the prefetch 8 or 16 KB ahead 1.72-1.80x);
// half or a quarter of the chains in memory was no better than all (1.29-1.47x against 1.30-1.45x).
template <bool kPaced>
struct Chains {
  __m512d* reg;
  alignas(64) double mem[8 * kAcc];

  explicit Chains(__m512d* s) : reg(s) {
    if (kPaced) {
      for (int k = 0; k < kAcc; ++k) _mm512_store_pd(mem + 8 * k, reg[k]);
    }
  }
  ~Chains() {
    if (kPaced) {
      for (int k = 0; k < kAcc; ++k) reg[k] = _mm512_load_pd(mem + 8 * k);
    }
  }
  template <typename F>
  void update(int k, F&& f) {
    if constexpr (kPaced) {
      _mm512_store_pd(mem + 8 * k, f(_mm512_load_pd(mem + 8 * k)));
      asm volatile("" ::: "memory");
    } else {
      reg[k] = f(reg[k]);
    }
  }
};

inline double add_lanes(const __m512d* s) {
  const __m512d a = _mm512_add_pd(_mm512_add_pd(s[0], s[1]), _mm512_add_pd(s[2], s[3]));
  const __m512d b = _mm512_add_pd(_mm512_add_pd(s[4], s[5]), _mm512_add_pd(s[6], s[7]));
  return _mm512_reduce_add_pd(_mm512_add_pd(a, b));
}

template <bool kSquares>
inline __m512d accumulate(__m512d s, __m512d d) {
  if (kSquares) return _mm512_fmadd_pd(d, d, s);
  return _mm512_add_pd(s, _mm512_abs_pd(d));
}

// float32, 64 elements a step: eight widenings into eight chains, then the amax of the same bytes
// (from L1) on the sign-cleared bit patterns, whose unsigned order is the magnitudes' for finite
// values.
template <bool kSquares, bool kPaced>
inline void main_f32(const float* x, int64_t main, __m512d* s, float& amax) {
  const __m512i mag = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;
  {
    Chains<kPaced> c(s);
    for (int64_t j = 0; j < main; j += 64) {
      for (int k = 0; k < kAcc; ++k) {
        if (kPaced && k % 2 == 0) prefetch_l2(ahead + 4 * j + 32 * k);
        const __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8 * k));
        c.update(k, [&](__m512d a) { return accumulate<kSquares>(a, d); });
      }
      for (int k = 0; k < 4; ++k) m = _mm512_max_epu32(m, _mm512_and_si512(mag, _mm512_loadu_si512(x + j + 16 * k)));
    }
  }
  const uint32_t top = _mm512_reduce_max_epu32(m);
  std::memcpy(&amax, &top, sizeof amax);
}

// float64, 64 elements a step (eight lines): eight loads summed into eight chains, amax by
// vmaxpd on |x|. Raw sums, as the other copies' loop in stats_loops.inc (scaled_fast): the caller
// checks the sum and sums a block again relative to its amax when it left the safe range.
template <bool kSquares, bool kPaced>
inline void main_f64(const double* x, int64_t main, __m512d* s, double& amax) {
  __m512d m = _mm512_setzero_pd();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;
  {
    Chains<kPaced> c(s);
    for (int64_t j = 0; j < main; j += 64) {
      for (int k = 0; k < kAcc; ++k) {
        if (kPaced) prefetch_l2(ahead + 8 * j + 64 * k);
        const __m512d d = _mm512_loadu_pd(x + j + 8 * k);
        c.update(k, [&](__m512d a) { return accumulate<kSquares>(a, d); });
        m = _mm512_max_pd(m, _mm512_abs_pd(d));
      }
    }
  }
  amax = _mm512_reduce_max_pd(m);
}

// float64: raw sum of x^2 (kSquares) or |x| and max |x| of n elements, NaN/Inf making the sum
// NaN/Inf (their amax is then meaningless, as in the loop this replaces).
template <bool kSquares>
inline void raw_sums_f64(const double* x, int64_t n, double& sum, double& amax) {
  const int64_t main = n - n % 64;
  __m512d s[kAcc];
  for (auto& v : s) v = _mm512_setzero_pd();
  double m = 0.0;
  if (main > 0) {
    if (prefetch_helps()) {
      main_f64<kSquares, true>(x, main, s, m);
    } else {
      main_f64<kSquares, false>(x, main, s, m);
    }
  }
  double r = add_lanes(s);
  for (int64_t j = main; j < n; ++j) {
    const double a = std::fabs(x[j]);  // +0.0 for -0.0, as vandpd makes in the main loop
    r += kSquares ? a * a : a;
    m = m > a ? m : a;
  }
  sum = r;
  amax = m;
}

// float16/bfloat16 squares, 64 elements a step, into eight chains; the amax as a bit pattern. The
// bits of the squares move into double lanes by shifts and masks (no shuffle), and no double they
// make is subnormal: a subnormal operand costs a microcode assist on Intel cores, ~10x the whole
// loop's time on float16 gradients of std 1e-3 (5% of them subnormal), measured on 2026-12-07.
//
// bfloat16: a word's 15 magnitude bits moved to bits [45, 60) of its 64-bit lane (one shift; word
// k sits at bit 16k) put its exponent field in the double's, and bits 60 and 61 add 768 to it,
// mask and exponent in one vpternlogq ((w & place) | exponent): the double is |x| x 2^-128, its
// square x^2 x 2^-256 is normal and finite, and one FMA adds it; the sum is scaled by 2^256 once.
// A zero or subnormal word takes the leading 1 it lacks and comes out as a square below 2^-252
// (times 2^-256): sums() sums a segment again where that could show.
template <bool kPaced>
inline uint16_t squares16(const c10::BFloat16* x, int64_t main, __m512d* s, double& scale) {
  const __m512i place = _mm512_set1_epi64(int64_t(0x7fff) << 45);
  const __m512i exponent = _mm512_set1_epi64(int64_t(3) << 60);
  const __m512i mag = _mm512_set1_epi16(0x7fff);
  __m512i m = _mm512_setzero_si512();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;
  {
    Chains<kPaced> c(s);
    for (int64_t j = 0; j < main; j += 64) {
      for (int u = 0; u < 2; ++u) {
        if (kPaced) prefetch_l2(ahead + 2 * j + 64 * u);
        const __m512i v = _mm512_loadu_si512(x + j + 32 * u);
        const __m512i w[4] = {_mm512_slli_epi64(v, 45), _mm512_slli_epi64(v, 29), _mm512_slli_epi64(v, 13),
                              _mm512_srli_epi64(v, 3)};
        for (int k = 0; k < 4; ++k) {
          const __m512d a = _mm512_castsi512_pd(_mm512_ternarylogic_epi64(w[k], place, exponent, 0xEA));
          c.update(4 * u + k, [&](__m512d acc) { return _mm512_fmadd_pd(a, a, acc); });
        }
        m = _mm512_max_epu16(m, _mm512_and_si512(v, mag));
      }
    }
  }
  scale = 0x1p256;
  const __m256i half = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1));
  return simd::amax_bits(half);
}

// float16: vcvtph2ps, then squared in float32, exactly (11-bit significands; 65504^2 and
// (2^-24)^2 are normal floats). A square's bits moved to bits [29, 60) of a 64-bit lane (the low
// float's by a left shift, the high one's by a right shift, each then masked) are the double
// sq x 2^-896, normal, added with a plain add; the sum is scaled by 2^896 once.
template <bool kPaced>
inline uint16_t squares16(const c10::Half* x, int64_t main, __m512d* s, double& scale) {
  const __m512i place = _mm512_set1_epi64(int64_t(0x7fffffff) << 29);
  const __m512i mag = _mm512_set1_epi16(0x7fff);
  __m512i m = _mm512_setzero_si512();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;
  {
    Chains<kPaced> c(s);
    for (int64_t j = 0; j < main; j += 64) {
      for (int k = 0; k < 4; ++k) {
        if (kPaced && k % 2 == 0) prefetch_l2(ahead + 2 * j + 32 * k);
        const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16 * k)));
        const __m512i sq = _mm512_castps_si512(_mm512_mul_ps(f, f));
        const __m512d lo = _mm512_castsi512_pd(_mm512_and_si512(_mm512_slli_epi64(sq, 29), place));
        const __m512d hi = _mm512_castsi512_pd(_mm512_and_si512(_mm512_srli_epi64(sq, 3), place));
        c.update(2 * k, [&](__m512d acc) { return _mm512_add_pd(acc, lo); });
        c.update(2 * k + 1, [&](__m512d acc) { return _mm512_add_pd(acc, hi); });
      }
      m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(x + j), mag));
      m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(x + j + 32), mag));
    }
  }
  scale = 0x1p896;
  const __m256i half = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1));
  return simd::amax_bits(half);
}

// sum = sum of x^2 (kSquares) or of |x|, in double; amax = max |x|; the contract of simd::sums
// (stats_ymm.h), which takes the last n % 64 elements and 16-bit sums of |x|.
template <typename T, bool kSquares, bool kSumUsed = true>
inline void sums(const T* x, int64_t n, double& sum, float& amax) {
  constexpr bool kFloat = std::is_same<T, float>::value;
  const int64_t main = n - n % 64;
  // A 16-bit sum of |x|, or fewer elements than one step: the 16-element tensors of a long list,
  // where reducing the empty chains (these and the 256-bit loop's, see simd::sums) took a quarter
  // of the time (1,000 such float32 tensors, one thread, the Xeon of 2026-12-07: GradGuard's
  // grad_stats_of call 76-81 us before, 56-59 after).
  if (!(kFloat || kSquares) || main == 0) {
    simd::sums<T, kSquares, kSumUsed>(x, n, sum, amax);
    return;
  }
  if constexpr (kFloat || kSquares) {
    __m512d s[kAcc];
    for (auto& v : s) v = _mm512_setzero_pd();
    double main_sum;
    float main_amax = 0.f;
    if constexpr (kFloat) {
      if (prefetch_helps()) {
        main_f32<kSquares, true>(x, main, s, main_amax);
      } else {
        main_f32<kSquares, false>(x, main, s, main_amax);
      }
      main_sum = add_lanes(s);
    } else {
      double scale = 1.0;
      const uint16_t top = prefetch_helps() ? squares16<true>(x, main, s, scale) : squares16<false>(x, main, s, scale);
      if (top >= simd::nonfinite_bits(x)) {
        main_sum = std::numeric_limits<double>::quiet_NaN();
      } else if (top == 0) {
        main_sum = 0.0;  // all zeros (bfloat16's came out as tiny squares)
      } else if (kSumUsed && simd::needs_exact_loop(x, top)) {
        // bfloat16 below 2^-60: the zeros' and subnormals' wrong squares could show (at or above
        // it, each is below 2^-252 against a sum of at least 2^-120). The 256-bit widening loop
        // sums the whole segment again, exactly.
        simd::sums<T, kSquares, kSumUsed, true>(x, n, sum, amax);
        return;
      } else {
        main_sum = add_lanes(s) * scale;
      }
      main_amax = static_cast<float>(T(top, T::from_bits()));
    }
    double rest_sum = 0.0;
    float rest_amax = 0.f;
    if (main < n) simd::sums<T, kSquares, kSumUsed>(x + main, n - main, rest_sum, rest_amax);
    sum = main_sum + rest_sum;
    amax = main_amax > rest_amax ? main_amax : rest_amax;
  }
}

}  // namespace simd512
}  // namespace gradguard
#pragma GCC pop_options
#endif

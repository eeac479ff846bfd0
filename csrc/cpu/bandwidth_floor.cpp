// Bandwidth floors for the bench (not part of the public API): how fast this machine can read,
// and read+write, a buffer, so that the kernels are judged against the memory, not against
// another kernel. torch.sum is not the floor: with one sequential stream per thread it leaves a
// large share of the read bandwidth unused.
//
// - gradguard_bench::read_floor(Tensor x, int streams): an integer sum over every 8-byte word of
//   x's bytes (no floating-point work that could be the bottleneck, whatever the dtype), each
//   thread's range cut into `streams` contiguous parts walked together, kStep bytes from each in
//   turn, so that the prefetchers track several sequential streams.
// - gradguard_bench::copy_floor(Tensor dst, Tensor src, int streams): the same walk, copying.
// - gradguard_bench::rewrite_floor(Tensor x, int key, int streams): the same walk, every word
//   read and written back in place (xor with `key`, a runtime value the compiler cannot fold:
//   0 leaves the bytes as they are). What any in-place rewrite of x (a clip's scale) must move.
// read_floor and rewrite_floor take `prefetch` (bytes, default 0): a software prefetch into L2
// that many bytes ahead of every 64-byte line. On an Intel Xeon (2026-12-07) the 512-bit kernels
// with a prefetch (csrc/cpu/prefetch.h) moved memory faster than every walk without one, so the
// bench's floors take the fastest of both kinds (there, 4, 8 and 16 KB ahead all read and
// rewrote at ~26 GB/s on two threads, against 22-23 and 20 without; the bench walks 4 and 8).
// The walks prefetch on every CPU; the kernels on Intel cores only (csrc/cpu/prefetch.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"

namespace gradguard {
namespace {

// A prefetch of the line at address a into L2 (T1: into L1, 2 KB ahead, the walks read 5-10% slower
// than into L2 4-16 KB ahead on the Intel Xeon of 2026-12-07). An address: it may lie past the
// end; a prefetch never faults. __builtin_prefetch: prefetcht1 on x86, a portable one elsewhere.
inline void prefetch_line(uintptr_t a) { __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2); }

constexpr int64_t kStepWords = 2048;  // 16 KB from one stream before moving to the next
constexpr int kMaxStreams = 16;

uint64_t sum_words_default(const uint64_t* x, int64_t n) {
  uint64_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
uint64_t sum_words_avx2(const uint64_t* x, int64_t n) {
  uint64_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}
#pragma GCC pop_options
#endif

// The same sums and xors, a prefetch `ahead` bytes past every 64-byte line (8 words: one vector
// add or xor for the compiler), the rest word by word.
uint64_t sum_words_prefetch_default(const uint64_t* x, int64_t n, int64_t ahead) {
  uint64_t s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    prefetch_line(reinterpret_cast<uintptr_t>(x + i) + ahead);
#pragma omp simd
    for (int k = 0; k < 8; ++k) s[k] += x[i + k];
  }
  uint64_t total = 0;
  for (; i < n; ++i) total += x[i];
  for (uint64_t v : s) total += v;
  return total;
}

void xor_words_prefetch_default(uint64_t* x, int64_t n, uint64_t key, int64_t ahead) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    prefetch_line(reinterpret_cast<uintptr_t>(x + i) + ahead);
#pragma omp simd
    for (int k = 0; k < 8; ++k) x[i + k] ^= key;
  }
  for (; i < n; ++i) x[i] ^= key;
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
uint64_t sum_words_prefetch_avx2(const uint64_t* x, int64_t n, int64_t ahead) {
  uint64_t s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    prefetch_line(reinterpret_cast<uintptr_t>(x + i) + ahead);
#pragma omp simd
    for (int k = 0; k < 8; ++k) s[k] += x[i + k];
  }
  uint64_t total = 0;
  for (; i < n; ++i) total += x[i];
  for (uint64_t v : s) total += v;
  return total;
}

void xor_words_prefetch_avx2(uint64_t* x, int64_t n, uint64_t key, int64_t ahead) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    prefetch_line(reinterpret_cast<uintptr_t>(x + i) + ahead);
#pragma omp simd
    for (int k = 0; k < 8; ++k) x[i + k] ^= key;
  }
  for (; i < n; ++i) x[i] ^= key;
}
#pragma GCC pop_options
#endif

void xor_words_default(uint64_t* x, int64_t n, uint64_t key) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] ^= key;
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
void xor_words_avx2(uint64_t* x, int64_t n, uint64_t key) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] ^= key;
}
#pragma GCC pop_options
#endif

void xor_words(uint64_t* x, int64_t n, uint64_t key, int64_t ahead) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return ahead > 0 ? xor_words_prefetch_avx2(x, n, key, ahead) : xor_words_avx2(x, n, key);
#endif
  if (ahead > 0) return xor_words_prefetch_default(x, n, key, ahead);
  xor_words_default(x, n, key);
}

uint64_t sum_words(const uint64_t* x, int64_t n, int64_t ahead) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return ahead > 0 ? sum_words_prefetch_avx2(x, n, ahead) : sum_words_avx2(x, n);
#endif
  return ahead > 0 ? sum_words_prefetch_default(x, n, ahead) : sum_words_default(x, n);
}

// Calls f(stream, word offset, word count) for the steps of every stream of [lo, hi), streams
// interleaved.
template <typename F>
void walk_streams(int64_t lo, int64_t hi, int streams, F&& f) {
  int64_t pos[kMaxStreams], end[kMaxStreams];
  for (int s = 0; s < streams; ++s) {
    pos[s] = lo + (hi - lo) * s / streams;
    end[s] = lo + (hi - lo) * (s + 1) / streams;
  }
  bool active = true;
  while (active) {
    active = false;
    for (int s = 0; s < streams; ++s) {
      if (pos[s] >= end[s]) continue;
      active = true;
      const int64_t len = std::min(kStepWords, end[s] - pos[s]);
      f(s, pos[s], len);
      pos[s] += len;
    }
  }
}

// Calls f(thread, stream, word offset, word count) for every step of [0, n) words: the range cut
// into one contiguous part per thread, each walked as `streams` interleaved streams.
template <typename F>
void walk_threads(int64_t n, int64_t streams, F&& f) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, nthreads, 1, [&](int64_t tlo, int64_t thi) {
    for (int64_t t = tlo; t < thi; ++t) {
      walk_streams(n * t / nthreads, n * (t + 1) / nthreads, static_cast<int>(streams),
                   [&](int s, int64_t off, int64_t len) { f(t, s, off, len); });
    }
  });
}

void check(const char* op, const at::Tensor& t, int64_t streams, int64_t prefetch = 0) {
  TORCH_CHECK(prefetch >= 0 && prefetch <= (int64_t(1) << 20), op, ": `prefetch` must be in [0, 2^20] bytes, got ",
              prefetch);
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), op, ": needs a contiguous CPU tensor");
  TORCH_CHECK(t.nbytes() % 8 == 0, op, ": the tensor's size in bytes must be a multiple of 8, got ", t.nbytes());
  TORCH_CHECK(streams >= 1 && streams <= kMaxStreams, op, ": `streams` must be in [1, ", kMaxStreams, "], got ",
              streams);
}

at::Tensor read_floor(const at::Tensor& x, int64_t streams, int64_t prefetch) {
  check("gradguard_bench.read_floor", x, streams, prefetch);
  const auto* w = static_cast<const uint64_t*>(x.const_data_ptr());
  const int64_t n = static_cast<int64_t>(x.nbytes() / 8);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<uint64_t> sums(nthreads * kMaxStreams, 0);
  walk_threads(n, streams,
               [&](int64_t t, int s, int64_t off, int64_t len) { sums[t * kMaxStreams + s] += sum_words(w + off, len, prefetch); });
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  // Returned so the compiler cannot drop the reads.
  return at::scalar_tensor(static_cast<int64_t>(total & 0x7fffffffffffffffULL), at::kLong);
}

void copy_floor(at::Tensor& dst, const at::Tensor& src, int64_t streams) {
  check("gradguard_bench.copy_floor", src, streams);
  check("gradguard_bench.copy_floor", dst, streams);
  TORCH_CHECK(dst.nbytes() == src.nbytes(), "gradguard_bench.copy_floor: `dst` and `src` differ in size");
  const auto* in = static_cast<const uint64_t*>(src.const_data_ptr());
  auto* out = static_cast<uint64_t*>(dst.mutable_data_ptr());
  walk_threads(static_cast<int64_t>(src.nbytes() / 8), streams,
               [&](int64_t, int, int64_t off, int64_t len) { std::memcpy(out + off, in + off, len * 8); });
}

void rewrite_floor(at::Tensor& x, int64_t key, int64_t streams, int64_t prefetch) {
  check("gradguard_bench.rewrite_floor", x, streams, prefetch);
  auto* w = static_cast<uint64_t*>(x.mutable_data_ptr());
  walk_threads(static_cast<int64_t>(x.nbytes() / 8), streams, [&](int64_t, int, int64_t off, int64_t len) {
    xor_words(w + off, len, static_cast<uint64_t>(key), prefetch);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gradguard_bench, m) {
  m.def("read_floor(Tensor x, int streams, int prefetch=0) -> Tensor");
  m.def("copy_floor(Tensor(a!) dst, Tensor src, int streams) -> ()");
  m.def("rewrite_floor(Tensor(a!) x, int key, int streams, int prefetch=0) -> ()");
}

TORCH_LIBRARY_IMPL(gradguard_bench, CPU, m) {
  m.impl("read_floor", &read_floor);
  m.impl("copy_floor", &copy_floor);
  m.impl("rewrite_floor", &rewrite_floor);
}

}  // namespace gradguard

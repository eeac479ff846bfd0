// One read pass over a list of same-dtype CPU tensors: per tensor, the sum of (|x| / amax)^p over
// the finite elements (the contract is in gradguard/_ops.py), the NaN and Inf counts, and the
// finite amax. Sums are formed in float64 for every input dtype.
//
// Determinism: the work is cut into fixed-size chunks that do not depend on the thread count,
// each chunk writes its own partial, and the partials are reduced in chunk order. The result has
// the same bits on 1 or N threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_empty.h"
#include "cpu_isa.h"
#include "kernel_dtypes.h"
#include "stats_ymm.h"
#include "stats_zmm.h"
#include "strided_walk.h"
#include "thread_count.h"

namespace gradguard {
namespace {

// 64K elements: large enough that per-chunk overhead is noise, small enough that 2 threads
// balance on a GPT-2-sized list, and a fixed constant so results are thread-count independent.
constexpr int64_t kChunk = int64_t(1) << 16;
// Each thread walks its range as one sequential stream, kStep elements per segment_stats call.
// Walking several contiguous parts together (so that the prefetchers track several streams) was
// slower whenever it was measured: on 2026-12-03 (GPT-2-small list, runs alternated) one stream
// per thread ran the float32 list at 0.99-1.16x the best read floor's time, two at 1.34-1.46x,
// four at 1.35-1.52x; on 2026-12-05 (a Zen 4 VM, one thread over 256 MB) 1, 2 and 4 streams ran
// at 24, 22-23 and 19 GB/s. kStep is a multiple of every inner block and fixed, so the partials
// (and the result bits) do not depend on the thread count.
constexpr int64_t kStep = int64_t(1) << 12;

enum class Norm { L1, L2, Inf, Generic };

// For float64 input and generic p, |x|^p can leave double's range: partials then hold sums
// normalized by their own amax. Otherwise they hold raw double sums, normalized once per tensor.
template <typename T, Norm N>
constexpr bool kScaled = std::is_same_v<T, double> || N == Norm::Generic;

struct Partial {
  double acc = 0.0;
  double amax = 0.0;
  int64_t nan = 0;
  int64_t inf = 0;
};

template <Norm N>
inline double ratio_pow(double r, double p) {
  if (N == Norm::L1) return r;
  if (N == Norm::L2) return r * r;
  return std::pow(r, p);
}

// Adds a normalized sum r (relative to m) into out (relative to out.amax): the smaller scale is
// rescaled by a factor <= 1, so nothing overflows; what underflows weighs < 2^-1000 of the rest.
template <Norm N>
inline void merge_scaled(Partial& out, double r, double m, double p) {
  if (m == 0.0) return;
  if (m > out.amax) {
    out.acc = (out.amax > 0.0 ? out.acc * ratio_pow<N>(out.amax / m, p) : 0.0) + r;
    out.amax = m;
  } else {
    out.acc += r * ratio_pow<N>(m / out.amax, p);
  }
}

namespace isa_default {
constexpr bool kSimdCopy = false;
constexpr bool kZmmCopy = false;
#include "stats_loops.inc"
}  // namespace isa_default

#pragma GCC push_options
GG_TARGET_AVX2
namespace isa_avx2 {
constexpr bool kSimdCopy = GG_CPU_X86 != 0;
constexpr bool kZmmCopy = false;
#include "stats_loops.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
GG_TARGET_AVX512
namespace isa_avx512 {
constexpr bool kSimdCopy = GG_CPU_X86 != 0;
constexpr bool kZmmCopy = GG_CPU_X86 != 0;
#include "stats_loops.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

const bool kHasAvx2 = cpu_has_avx2();
const bool kHasAvx512 = cpu_has_avx512();

template <typename T, Norm N>
inline void segment_stats(const T* x, int64_t n, int64_t stride, double p, Partial& out) {
  if (kHasAvx512) {
    isa_avx512::segment_stats<T, N>(x, n, stride, p, out);
  } else if (kHasAvx2) {
    isa_avx2::segment_stats<T, N>(x, n, stride, p, out);
  } else {
    isa_default::segment_stats<T, N>(x, n, stride, p, out);
  }
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// First item of each of `parts` contiguous groups of [lo, hi) holding about equal elements.
std::vector<int64_t> split_by_elements(const std::vector<int64_t>& prefix, int64_t lo, int64_t hi, int64_t parts) {
  std::vector<int64_t> cut(parts + 1, hi);
  cut[0] = lo;
  const int64_t base = prefix[lo], total = prefix[hi] - prefix[lo];
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = base + total * k / parts;
    cut[k] = std::lower_bound(prefix.begin() + lo, prefix.begin() + hi, target) - prefix.begin();
    cut[k] = std::max(cut[k], cut[k - 1]);
  }
  return cut;
}

// One work item, elements [begin, end) of a tensor, into `part`, kStep elements at a time (the
// same segments on one thread or many, so the same bits).
template <typename T, Norm N>
inline void item_stats(const StridedWalk& walk, int64_t begin, int64_t end, double p, Partial& part) {
  const T* base = static_cast<const T*>(walk.data);
  if (walk.dense) {
    for (int64_t b = begin; b < end; b += kStep) segment_stats<T, N>(base + b, std::min(kStep, end - b), 1, p, part);
  } else {
    walk.for_each_row(begin, end, [&](int64_t offset, int64_t len, int64_t stride) {
      segment_stats<T, N>(base + offset, len, stride, p, part);
    });
  }
}

// Merges the next chunk's partial of a tensor into its total, in chunk order.
template <typename T, Norm N>
inline void merge_partial(Partial& out, const Partial& part, double p) {
  out.nan += part.nan;
  out.inf += part.inf;
  if constexpr (kScaled<T, N>) {
    if (N == Norm::Inf) {
      out.amax = std::max(out.amax, part.amax);
    } else {
      merge_scaled<N>(out, part.acc, part.amax, p);
    }
  } else {
    out.acc += part.acc;
    out.amax = std::max(out.amax, part.amax);
  }
}

// The op's `acc` of a tensor's total: normalized by amax^p (see gradguard/_ops.py).
template <typename T, Norm N>
inline double finish_acc(const Partial& out, double p) {
  if (N == Norm::Inf) return out.amax > 0.0 ? 1.0 : 0.0;
  if (!kScaled<T, N>) return out.amax > 0.0 ? out.acc / ratio_pow<N>(out.amax, p) : 0.0;
  return out.acc;
}

struct Outputs {
  double* acc;
  double* amax;
  int64_t* nan;
  int64_t* inf;

  void write(size_t i, double a, const Partial& out) const {
    acc[i] = a;
    amax[i] = out.amax;
    nan[i] = out.nan;
    inf[i] = out.inf;
  }
};

template <typename T, Norm N>
void stats_kernel(at::TensorList ts, double p, const Outputs& res) {
  int64_t nwork = 0, numel = 0;
  for (const auto& t : ts) {
    nwork += (t.numel() + kChunk - 1) / kChunk;
    numel += t.numel();
  }
  const int64_t nthreads = threads_for(numel * int64_t(sizeof(T)), static_cast<int64_t>(ts.size()), nwork);
  if (nthreads == 1) {
    // One thread: tensor by tensor, with no work list. The same chunks merged in the same order
    // as below, so the same bits; at 1,000 tensors of 16 elements the lists below cost ~10 ns a
    // tensor.
    // A tensor's data is two dependent loads away (its storage, then the data), both cold when
    // the list was written long ago. Fetched list-wide first, one link a pass, their misses
    // overlap; tensor by tensor below, each small tensor waited for its own.
    for (const auto& t : ts) __builtin_prefetch(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
    for (const auto& t : ts) {
      if (t.numel() > 0) __builtin_prefetch(t.const_data_ptr());
    }
    for (const auto i : c10::irange(ts.size())) {
      const at::Tensor& t = ts[i];
      const int64_t count = t.numel();
      if (count > 0 && count <= kStep && t.is_non_overlapping_and_dense()) {
        // One chunk of one segment: the calls the loop below makes for it, in the same order, so
        // the same bits, without building its walk and running its loops (4 of the 47 us of
        // GradGuard's call over 1,000 16-element tensors, warm, 2026-12-07).
        Partial part, out;
        segment_stats<T, N>(static_cast<const T*>(t.const_data_ptr()), count, 1, p, part);
        merge_partial<T, N>(out, part, p);
        res.write(i, finish_acc<T, N>(out, p), out);
        continue;
      }
      const StridedWalk walk(t);
      Partial out;
      for (int64_t b = 0; b < walk.numel; b += kChunk) {
        Partial part;
        item_stats<T, N>(walk, b, std::min(walk.numel, b + kChunk), p, part);
        merge_partial<T, N>(out, part, p);
      }
      res.write(i, finish_acc<T, N>(out, p), out);
    }
    return;
  }
  std::vector<WorkItem> work;
  work.reserve(nwork);
  for (const auto i : c10::irange(ts.size())) {
    const int64_t count = ts[i].numel();
    for (int64_t b = 0; b < count; b += kChunk) {
      work.push_back({static_cast<int64_t>(i), b, std::min(count, b + kChunk)});
    }
  }
  std::vector<int64_t> prefix(nwork + 1, 0);
  for (int64_t w = 0; w < nwork; ++w) prefix[w + 1] = prefix[w] + (work[w].end - work[w].begin);
  std::vector<Partial> partials(work.size());
  std::vector<StridedWalk> walks;
  walks.reserve(ts.size());
  for (const auto& t : ts) walks.emplace_back(t);

  // Threads get equal element counts (a list of many small tensors splits across tensors, not
  // only within one).
  const std::vector<int64_t> per_thread = split_by_elements(prefix, 0, nwork, nthreads);
  at::parallel_for(0, nthreads, 1, [&](int64_t tlo, int64_t thi) {
    for (int64_t w = per_thread[tlo]; w < per_thread[thi]; ++w) {
      item_stats<T, N>(walks[work[w].tensor], work[w].begin, work[w].end, p, partials[w]);
    }
  });

  // Per tensor, in chunk order (the same bits on any thread count).
  std::vector<Partial> per_tensor(ts.size());
  for (const auto w : c10::irange(work.size())) merge_partial<T, N>(per_tensor[work[w].tensor], partials[w], p);
  for (const auto i : c10::irange(ts.size())) res.write(i, finish_acc<T, N>(per_tensor[i], p), per_tensor[i]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_tensor_stats_cpu(at::TensorList tensors,
                                                                                  double norm_type) {
  TORCH_CHECK(!tensors.empty(), "gradguard.multi_tensor_stats: `tensors` must not be empty");
  TORCH_CHECK_VALUE(norm_type > 0.0, "gradguard.multi_tensor_stats: `norm_type` must be > 0, got ", norm_type);
  const auto dtype = tensors[0].scalar_type();
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "gradguard.multi_tensor_stats (CPU kernel): tensors[", i, "] is on ", t.device(),
                "; every tensor of one call must be on the CPU");
    TORCH_CHECK(t.scalar_type() == dtype, "gradguard.multi_tensor_stats: tensors[", i, "] has dtype ", t.scalar_type(),
                " but tensors[0] has ", dtype, "; group tensors by dtype before calling the op");
    TORCH_CHECK(t.layout() == at::kStrided, "gradguard.multi_tensor_stats: tensors[", i,
                "] is not a strided (dense) tensor; pass the values of a sparse tensor instead");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(is_kernel_dtype(dtype), "gradguard.multi_tensor_stats: dtype ", dtype,
                              " is not supported; the op takes float16, bfloat16, float32 and float64 tensors");
  // The list is not copied: a copy would bump and drop a reference count per tensor.
  const int64_t n = static_cast<int64_t>(tensors.size());
  // Every entry is written by stats_kernel: no zero fill (cpu_empty.h).
  at::Tensor acc = cpu_empty({n}, at::kDouble), amax = cpu_empty({n}, at::kDouble);
  at::Tensor nan_count = cpu_empty({n}, at::kLong), inf_count = cpu_empty({n}, at::kLong);

  const Outputs res{acc.mutable_data_ptr<double>(), amax.mutable_data_ptr<double>(),
                    nan_count.mutable_data_ptr<int64_t>(), inf_count.mutable_data_ptr<int64_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_multi_tensor_stats_cpu", [&] {
    if (norm_type == 2.0) {
      stats_kernel<scalar_t, Norm::L2>(tensors, norm_type, res);
    } else if (norm_type == 1.0) {
      stats_kernel<scalar_t, Norm::L1>(tensors, norm_type, res);
    } else if (std::isinf(norm_type)) {
      stats_kernel<scalar_t, Norm::Inf>(tensors, norm_type, res);
    } else {
      stats_kernel<scalar_t, Norm::Generic>(tensors, norm_type, res);
    }
  });
  return {acc, nan_count, inf_count, amax};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) {
  m.impl("multi_tensor_stats", &multi_tensor_stats_cpu);
}

}  // namespace gradguard

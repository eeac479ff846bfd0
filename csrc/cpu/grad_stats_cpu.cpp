// One read pass over a list of same-dtype CPU tensors: per tensor, the sum of |x|^p over the
// finite elements (or their max for p = inf), the NaN and Inf counts, and the finite amax.
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

#include "cpu_isa.h"
#include "strided_walk.h"

namespace gradguard {
namespace {

// 64K elements: large enough that per-chunk overhead is noise, small enough that 2 threads
// balance on a GPT-2-sized list, and a fixed constant so results are thread-count independent.
constexpr int64_t kChunk = int64_t(1) << 16;

enum class Norm { L1, L2, Inf, Generic };

struct Partial {
  double acc = 0.0;
  double amax = 0.0;
  int64_t nan = 0;
  int64_t inf = 0;
};

namespace isa_default {
#include "stats_loops.inc"
}  // namespace isa_default

#pragma GCC push_options
GG_TARGET_AVX2
namespace isa_avx2 {
#include "stats_loops.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

const bool kHasAvx2 = cpu_has_avx2();

template <typename T, Norm N>
inline void segment_stats(const T* x, int64_t n, int64_t stride, double p, Partial& out) {
  if (kHasAvx2) {
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

template <typename T, Norm N>
void stats_kernel(const std::vector<at::Tensor>& ts, double p, at::Tensor& acc, at::Tensor& nan_count,
                  at::Tensor& inf_count, at::Tensor& amax) {
  std::vector<WorkItem> work;
  for (const auto i : c10::irange(ts.size())) {
    const int64_t numel = ts[i].numel();
    for (int64_t b = 0; b < numel; b += kChunk) {
      work.push_back({static_cast<int64_t>(i), b, std::min(numel, b + kChunk)});
    }
  }
  std::vector<Partial> partials(work.size());
  std::vector<StridedWalk> walks;
  walks.reserve(ts.size());
  for (const auto& t : ts) walks.emplace_back(t);

  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& item = work[w];
      const StridedWalk& walk = walks[item.tensor];
      const T* base = static_cast<const T*>(walk.data);
      Partial& part = partials[w];
      if (walk.dense) {
        segment_stats<T, N>(base + item.begin, item.end - item.begin, 1, p, part);
      } else {
        walk.for_each_row(item.begin, item.end, [&](int64_t offset, int64_t len, int64_t stride) {
          segment_stats<T, N>(base + offset, len, stride, p, part);
        });
      }
    }
  });

  auto acc_a = acc.accessor<double, 1>();
  auto amax_a = amax.accessor<double, 1>();
  auto nan_a = nan_count.accessor<int64_t, 1>();
  auto inf_a = inf_count.accessor<int64_t, 1>();
  for (const auto w : c10::irange(work.size())) {
    const int64_t i = work[w].tensor;
    const Partial& part = partials[w];
    acc_a[i] += part.acc;
    amax_a[i] = std::max(amax_a[i], part.amax);
    nan_a[i] += part.nan;
    inf_a[i] += part.inf;
  }
  if (N == Norm::Inf) acc.copy_(amax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_tensor_stats_cpu(at::TensorList tensors,
                                                                                  double norm_type) {
  TORCH_CHECK(!tensors.empty(), "gradguard.multi_tensor_stats: `tensors` must not be empty");
  TORCH_CHECK(norm_type > 0.0, "gradguard.multi_tensor_stats: `norm_type` must be > 0, got ", norm_type);
  const auto dtype = tensors[0].scalar_type();
  std::vector<at::Tensor> ts;
  ts.reserve(tensors.size());
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "gradguard.multi_tensor_stats (CPU kernel): tensors[", i, "] is on ", t.device(),
                "; every tensor of one call must be on the CPU");
    TORCH_CHECK(t.scalar_type() == dtype, "gradguard.multi_tensor_stats: tensors[", i, "] has dtype ", t.scalar_type(),
                " but tensors[0] has ", dtype, "; group tensors by dtype before calling the op");
    TORCH_CHECK(t.layout() == at::kStrided, "gradguard.multi_tensor_stats: tensors[", i,
                "] is not a strided (dense) tensor; pass the values of a sparse tensor instead");
    ts.push_back(t);
  }
  const int64_t n = static_cast<int64_t>(ts.size());
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  auto i64 = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  at::Tensor acc = at::zeros({n}, f64), amax = at::zeros({n}, f64);
  at::Tensor nan_count = at::zeros({n}, i64), inf_count = at::zeros({n}, i64);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_multi_tensor_stats_cpu", [&] {
    if (norm_type == 2.0) {
      stats_kernel<scalar_t, Norm::L2>(ts, norm_type, acc, nan_count, inf_count, amax);
    } else if (norm_type == 1.0) {
      stats_kernel<scalar_t, Norm::L1>(ts, norm_type, acc, nan_count, inf_count, amax);
    } else if (std::isinf(norm_type)) {
      stats_kernel<scalar_t, Norm::Inf>(ts, norm_type, acc, nan_count, inf_count, amax);
    } else {
      stats_kernel<scalar_t, Norm::Generic>(ts, norm_type, acc, nan_count, inf_count, amax);
    }
  });
  return {acc, nan_count, inf_count, amax};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) {
  m.impl("multi_tensor_stats", &multi_tensor_stats_cpu);
}

}  // namespace gradguard

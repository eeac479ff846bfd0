// In-place scaling of a list of same-dtype CPU tensors by a 0-dim factor, for clipping:
// - maybe_scale_: x *= scale, except that a scale of exactly 1 writes nothing, so an unclipped
//   or skipped step leaves every bit of the grads as it was (a multiply by 1 would still rewrite
//   them, and canonicalizes NaN payloads in float16/bfloat16);
// - zero_nonfinite_and_scale_: NaN/Inf become 0 and the rest is scaled, in the same single pass
//   (instead of nan_to_num_ followed by mul_).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "kernel_dtypes.h"
#include "memory_spans.h"
#include "scale_zmm.h"
#include "simd_avx2.h"
#include "strided_walk.h"
#include "thread_count.h"

namespace gradguard {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

const bool kHasAvx2 = cpu_has_avx2();
const bool kHasAvx512 = cpu_has_avx512();

// x *= scale, the non-finite elements zeroed first when kZero (so a negative scale gives -0.0
// there, as nan_to_num_ + mul_ do); float16/bfloat16 computed in float32 and rounded once, as
// torch's multiply does.
template <bool kZero, typename T>
void scale_row(T* x, int64_t n, int64_t stride, double scale) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t s = static_cast<acc_t>(scale);
#if GG_CPU_X86
  // Contiguous float16/bfloat16: the AVX-512 or AVX2 loop (the one below stays scalar for them:
  // 11x slower).
  if constexpr (kIs16Bit<T>) {
    if (kHasAvx512 && stride == 1) {
      simd16_512::scale<std::is_same_v<T, at::Half>, kZero>(reinterpret_cast<uint16_t*>(x), n, s);
      return;
    }
    if (kHasAvx2 && stride == 1) {
      simd16::scale<std::is_same_v<T, at::Half>, kZero>(reinterpret_cast<uint16_t*>(x), n, s);
      return;
    }
  } else {
    if (kHasAvx512 && stride == 1) {
      simdf_512::scale<kZero>(x, n, s);
      return;
    }
    if (kHasAvx2 && stride == 1) {  // the AVX2 loop: this one is compiled for the portable ISA
      simdf::scale<kZero>(x, n, s);
      return;
    }
  }
#endif
  const acc_t big = std::numeric_limits<acc_t>::max();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j * stride]);
    x[j * stride] = static_cast<T>((!kZero || std::abs(v) <= big ? v : acc_t(0)) * s);
  }
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void check_scale(const char* op, const at::Tensor& scale) {
  check_scale_kind(op, scale);
  TORCH_CHECK(scale.device().is_cpu(), op, " (CPU kernel): `scale` is on ", scale.device(),
              "; it must be on the CPU with the tensors");
}

void check_tensors(const char* op, at::TensorList tensors) {
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), op, ": tensors[", i, "] is on ", t.device(),
                "; every tensor of one call must be on the CPU");
    check_scaled_tensor(op, i, t, tensors[0].scalar_type());
  }
}

// Every element of every tensor through scale_row<kZero>, in 64K-element pieces over threads.
template <bool kZero>
void scale_list(at::TensorList tensors, double s) {
  // Written in place without torch's in-place machinery: bump the version counters as it would
  // (before any write: an inference tensor outside inference mode is refused here, untouched).
  for (const auto& t : tensors) t.unsafeGetTensorImpl()->bump_version();
  const auto dtype = tensors[0].scalar_type();
  std::vector<StridedWalk> walks;
  std::vector<void*> bases;  // mutable_data_ptr(): a lazily cloned (COW) storage is copied before the write
  std::vector<WorkItem> work;
  int64_t numel = 0;
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    walks.emplace_back(t);
    bases.push_back(t.mutable_data_ptr());
    numel += t.numel();
    for (int64_t b = 0; b < t.numel(); b += kChunk) {
      work.push_back({static_cast<int64_t>(i), b, std::min(t.numel(), b + kChunk)});
    }
  }
  const int64_t nwork = static_cast<int64_t>(work.size());
  // Bytes moved: each element is read and written.
  int64_t nthreads = threads_for(2 * numel * int64_t(tensors[0].element_size()),
                                 static_cast<int64_t>(tensors.size()), nwork);
  if (nthreads > 1 && spans_overlap(tensors)) nthreads = 1;  // checked only where threads would race (memory_spans.h)
  const int64_t grain = (nwork + nthreads - 1) / nthreads;  // at most nthreads parts; one runs inline
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_scale_cpu", [&] {
    at::parallel_for(0, nwork, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const WorkItem& item = work[w];
        const StridedWalk& walk = walks[item.tensor];
        scalar_t* base = static_cast<scalar_t*>(bases[item.tensor]);
        if (walk.dense) {
          scale_row<kZero, scalar_t>(base + item.begin, item.end - item.begin, 1, s);
        } else {
          walk.for_each_row(item.begin, item.end, [&](int64_t off, int64_t len, int64_t stride) {
            scale_row<kZero, scalar_t>(base + off, len, stride, s);
          });
        }
      }
    });
  });
}


void zero_nonfinite_and_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  const char* op = "gradguard.zero_nonfinite_and_scale_";
  check_scale(op, scale);
  check_tensors(op, tensors);
  check_scaled_dtype(op, tensors);
  if (tensors.empty()) return;
  const double s = scale.to(at::kDouble).item<double>();  // a CPU tensor: no device sync
  scale_list<true>(tensors, op_math_scale(scale, s, tensors[0].scalar_type()));
}

void maybe_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  check_scale("gradguard.maybe_scale_", scale);
  check_tensors("gradguard.maybe_scale_", tensors);
  check_scaled_dtype("gradguard.maybe_scale_", tensors);
  if (tensors.empty()) return;
  const double s = scale.to(at::kDouble).item<double>();  // a CPU tensor: no device sync
  if (s == 1.0) return;
  const auto dtype = tensors[0].scalar_type();
  if (kHasAvx512 || (kHasAvx2 && (dtype == at::kHalf || dtype == at::kBFloat16))) {
    // The AVX2 loop: torch's bfloat16 multiply ran at 1.6x the in-place floor, this at ~1.3x.
    // The AVX-512 loops (scale_zmm.h) for every dtype: float32 at 1.01x the rewrite floor where
    // torch's _foreach_mul_ took 1.24-1.27x (GPT-2-small list, 2026-12-07, Intel Xeon).
    scale_list<false>(tensors, op_math_scale(scale, s, dtype));
    return;
  }
  // float32/float64 (and float16/bfloat16 without AVX2): torch's own foreach kernel, compiled for
  // this CPU's widest ISA, which a plain loop at the portable flags does not match for a
  // read+write pass. By a new 0-dim tensor of the value already read, in the op's math dtype: a
  // scale that is an element of one of the tensors then counts with the value it had, as in the
  // loops above (torch's op refused the alias), and a 0-dim float32 tensor is multiplied by the
  // float32 value as every other (a float64 0-dim scale promoted its product to float64, rounded
  // once: 1 ulp off). A tensor, not a Scalar: torch multiplies a float16 tensor by a Scalar in
  // another rounding than by a 0-dim float32 tensor (the every-pattern test saw it).
  // A float32 one rounded here: scalar_tensor range-checks a double beyond float32 (a float64 scale
  // of 1e39 raised "cannot be converted to type float without overflow" on this path alone, where
  // the loops above and the reference multiply by its float32 rounding, inf).
  const double v = op_math_scale(scale, s, dtype);
  const auto op_math = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::_foreach_mul_(tensors, at::scalar_tensor(dtype == at::kDouble ? v : static_cast<double>(static_cast<float>(v)),
                                               at::TensorOptions().dtype(op_math)));
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) {
  m.impl("maybe_scale_", &maybe_scale_cpu);
  m.impl("zero_nonfinite_and_scale_", &zero_nonfinite_and_scale_cpu);
}

}  // namespace gradguard

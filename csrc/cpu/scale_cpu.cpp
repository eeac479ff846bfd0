// In-place scaling of a list of same-dtype CPU tensors by a 0-dim factor, with every non-finite
// element replaced by 0 in the same pass (clip_grad_norm_(nonfinite="zero")): one read and one
// write instead of nan_to_num_ followed by mul_.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "strided_walk.h"

namespace gradguard {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;

template <typename T>
void zero_nonfinite_scale_row(T* x, int64_t n, int64_t stride, float scale_f, double scale_d) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t s = std::is_same_v<T, double> ? static_cast<acc_t>(scale_d) : static_cast<acc_t>(scale_f);
  const acc_t big = std::numeric_limits<acc_t>::max();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j * stride]);
    x[j * stride] = static_cast<T>(std::abs(v) <= big ? v * s : acc_t(0));
  }
}

void zero_nonfinite_and_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "gradguard.zero_nonfinite_and_scale_: `scale` must hold one element, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.device().is_cpu(), "gradguard.zero_nonfinite_and_scale_ (CPU kernel): `scale` is on ",
              scale.device(), "; it must be on the CPU with the tensors");
  if (tensors.empty()) return;
  const double scale_d = scale.to(at::kDouble).item<double>();  // CPU tensor: no device sync
  const auto dtype = tensors[0].scalar_type();
  for (const auto i : c10::irange(tensors.size())) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "gradguard.zero_nonfinite_and_scale_: tensors[", i, "] is on ",
                tensors[i].device(), "; every tensor of one call must be on the CPU");
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "gradguard.zero_nonfinite_and_scale_: tensors[", i,
                "] has dtype ", tensors[i].scalar_type(), " but tensors[0] has ", dtype);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_zero_nonfinite_and_scale_cpu", [&] {
    for (const auto& t : tensors) {
      if (t.numel() == 0) continue;
      StridedWalk walk(t);
      // Writing through a view whose elements alias each other would scale them twice: refuse
      // it with the same check (and message) as torch's own in-place ops.
      at::assert_no_internal_overlap(t);
      scalar_t* base = static_cast<scalar_t*>(walk.data);
      const int64_t numel = t.numel();
      at::parallel_for(0, numel, kChunk, [&](int64_t lo, int64_t hi) {
        if (walk.dense) {
          zero_nonfinite_scale_row<scalar_t>(base + lo, hi - lo, 1, static_cast<float>(scale_d), scale_d);
        } else {
          walk.for_each_row(lo, hi, [&](int64_t off, int64_t len, int64_t stride) {
            zero_nonfinite_scale_row<scalar_t>(base + off, len, stride, static_cast<float>(scale_d), scale_d);
          });
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) {
  m.impl("zero_nonfinite_and_scale_", &zero_nonfinite_and_scale_cpu);
}

}  // namespace gradguard

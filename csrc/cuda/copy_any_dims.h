// Device copies of a view whatever its number of dims. torch's CUDA copy refuses a tensor with
// more than 25 dims it cannot merge ("tensor has too many (>25) dims", OffsetCalculator's
// MAX_DIMS), which is exactly the view the kernels' argument table cannot describe either; so
// such a view is copied one outer slice at a time, each slice one dim fewer, down to 25. Host
// code only (ATen calls), no host sync; one copy per outer slice, so only the pathological
// >25-dim views pay the extra launches.
#pragma once

#include <ATen/ATen.h>

namespace gradguard {

constexpr int64_t kTorchCopyMaxDims = 25;

inline void copy_any_dims(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.dim() <= kTorchCopyMaxDims) {
    dst.copy_(src);
    return;
  }
  for (int64_t i = 0; i < dst.size(0); ++i) copy_any_dims(dst.select(0, i), src.select(0, i));
}

inline at::Tensor contiguous_any_dims(const at::Tensor& t) {
  if (t.dim() <= kTorchCopyMaxDims) return t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  copy_any_dims(out, t);
  return out;
}

}  // namespace gradguard

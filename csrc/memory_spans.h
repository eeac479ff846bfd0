// Whether the tensors of one in-place scaling call share memory (one gradient listed twice, or a
// view and its base). Both kernels then scale them one after the other, as torch's foreach ops do
// on the CPU: CPU threads, or the blocks of one CUDA launch, would race over the shared elements
// and leave each as x*s or x*s^2 at random. Disjoint views of one buffer (DDP's
// gradient_as_bucket_view, flat gradient buffers) keep the parallel path: what is compared is the
// span of bytes each tensor covers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace gradguard {

inline bool spans_overlap(at::TensorList tensors) {
  std::vector<std::pair<const char*, const char*>> spans;
  spans.reserve(tensors.size());
  bool ascending = true, descending = true;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the last element, in elements (strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.const_data_ptr());
    if (!spans.empty()) {
      if (begin < spans.back().first) ascending = false;
      if (begin > spans.back().first) descending = false;
    }
    spans.emplace_back(begin, begin + (last + 1) * t.element_size());
  }
  // Spans already in address order, either way (a flat buffer's views; gradients allocated in
  // backward's order), need no sort: this runs on every CUDA call, on the step's host path.
  if (descending && !ascending) {
    std::reverse(spans.begin(), spans.end());
  } else if (!ascending) {
    std::sort(spans.begin(), spans.end());
  }
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return true;
  }
  return false;
}

// Whether `t` shares a storage with one of `tensors` (a scale that is an element of a tensor it
// scales: a kernel that reads it from memory while blocks write the tensors reads s or s*s). One
// pointer compare a tensor: this runs on the step's host path.
inline bool shares_storage(const at::Tensor& t, at::TensorList tensors) {
  const c10::StorageImpl* mine = t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl();
  for (const auto& other : tensors) {
    if (other.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl() == mine) return true;
  }
  return false;
}

}  // namespace gradguard

// Visiting every element of a CPU tensor of any layout exactly once, without copying it.
//
// The statistics and the in-place scaling do not depend on element order, so a tensor whose
// elements fill a span of memory without gaps or overlaps (contiguous, transposed, permuted) is
// walked as one flat span, and any other view (slices with steps, expanded dims) is walked row by
// row over its innermost (smallest-stride) dimension. All indexing is 64-bit, so tensors of more
// than 2^31 elements are fine.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace gradguard {

struct StridedWalk {
  const void* data = nullptr;  // read only: const_data_ptr() leaves a lazily cloned (COW) storage shared
  bool dense = true;
  int64_t numel = 0;
  std::vector<int64_t> sizes;    // outermost first, after dropping size-1 dims and merging
  std::vector<int64_t> strides;  // in elements

  explicit StridedWalk(const at::Tensor& t) : data(t.const_data_ptr()), numel(t.numel()) {
    dense = t.is_non_overlapping_and_dense();
    if (dense) return;
    // Order dims by decreasing stride so the innermost row has the smallest stride.
    std::vector<int64_t> order(t.dim());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
    for (int64_t d : order) {
      const int64_t size = t.size(d), stride = t.stride(d);
      if (size == 1) continue;
      if (!sizes.empty() && strides.back() == stride * size) {
        // The previous (outer) dim steps over exactly this one: merge them.
        sizes.back() *= size;
        strides.back() = stride;
      } else {
        sizes.push_back(size);
        strides.push_back(stride);
      }
    }
    if (sizes.empty()) {  // a single element
      sizes.push_back(1);
      strides.push_back(1);
    }
  }

  // Calls f(offset, length, stride) for the rows covering linear indices [begin, end) of the
  // walk order; offsets and strides are in elements from `data`.
  template <typename F>
  void for_each_row(int64_t begin, int64_t end, F&& f) const {
    const int64_t inner = sizes.back();
    const int64_t inner_stride = strides.back();
    int64_t idx = begin;
    while (idx < end) {
      int64_t rest = idx / inner;
      const int64_t pos = idx % inner;
      int64_t offset = pos * inner_stride;
      for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
        offset += (rest % sizes[d]) * strides[d];
        rest /= sizes[d];
      }
      const int64_t len = std::min(inner - pos, end - idx);
      f(offset, len, inner_stride);
      idx += len;
    }
  }
};

}  // namespace gradguard

// How many threads a CPU kernel over a list of tensors should use.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace gradguard {

// Another thread costs a fork/join (~10 us on this VM) and, per tensor, ~90 ns more than one
// thread spends on it (the work lists, written by the calling thread, are read and written
// across cores; measured, the cause not pinned down), and it halves the time spent moving bytes
// at ~25 GB/s a thread: it pays from about 512 KB + 4.5 KB per tensor of bytes moved. Measured on
// 2026-12-05 (2 threads), the statistics read: 52 tensors broke even at 0.85 MB, 1,000 tensors
// between 4 and 16 MB (4 MB took 217 us on two threads, 141 us on one; 1,000 x 16 elements 152
// against 62); zero_nonfinite_and_scale_ (bytes read plus written): 1,000 x 1,024 elements 363
// against 237 us, 1,000 x 16 227 against 125. The kernels' results do not depend on the count.
inline int64_t threads_for(int64_t bytes, int64_t ntensors, int64_t nwork) {
  const int64_t per_thread = (int64_t(512) << 10) + ntensors * int64_t(4608);
  const int64_t worth = std::max<int64_t>(1, bytes / per_thread);
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), nwork, worth}));
}

}  // namespace gradguard

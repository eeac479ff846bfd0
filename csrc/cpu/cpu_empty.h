// A CPU tensor for a kernel that writes every element of it, made without going through the
// dispatcher. at::empty dispatches (key lookup, profiler hook, the deterministic-mode fill check)
// before it reaches this same allocation; the host-latency ops make 4 (multi_tensor_stats) and 7
// (guard_decide) outputs a call, and at the start of a step, with the dispatcher's code and data
// cold, guard_decide's seven took 3.9 us (2026-12-07, Intel VM, 1,000 parameters).
// Only for outputs whose every element the kernel writes: the deterministic mode's NaN fill of
// uninitialized memory, skipped here, could never show.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

namespace gradguard {

inline at::Tensor cpu_empty(at::IntArrayRef size, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(size, dtype));
}

}  // namespace gradguard

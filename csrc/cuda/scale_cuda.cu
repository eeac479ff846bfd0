// In-place scaling of a list of same-dtype CUDA tensors by a 0-dim factor, for clipping, in one
// read and one write per element:
// - maybe_scale_: x *= scale, except that a scale of exactly 1 writes nothing (an unclipped or
//   skipped step leaves every bit of the grads as it was; a multiply by 1 would still rewrite
//   them and canonicalize float16/bfloat16 NaN payloads). Each block reads the factor and
//   returns at once when it is 1, so the check costs no host sync;
// - zero_nonfinite_and_scale_: NaN and +-Inf become 0 and the rest is scaled
//   (clip_grad_norm_(nonfinite="zero")).
//
// The factor is read by the kernel from device memory, so a norm-derived coefficient never
// visits the host and the ops are graph-capturable. A CPU factor is read on the host (no device
// sync) and passed by value.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "copy_any_dims.h"
#include "kernel_dtypes.h"
#include "kernel_image.h"
#include "memory_spans.h"
#include "multi_tensor_apply.cuh"
#include "strided_walk.h"

namespace gradguard {
namespace cuda {
namespace {

template <bool kZeroNonfinite, typename T, typename opmath_t>
__device__ __forceinline__ T scaled(T x, opmath_t s) {
  const opmath_t v = static_cast<opmath_t>(x);
  if constexpr (kZeroNonfinite) {
    const bool finite = (v < 0 ? -v : v) <= std::numeric_limits<opmath_t>::max();  // false for NaN
    // Zeroed, then scaled, as nan_to_num_ + mul_: a negative scale gives -0.0 there.
    return static_cast<T>((finite ? v : opmath_t(0)) * s);
  } else {
    return static_cast<T>(v * s);
  }
}

template <typename opmath_t>
__device__ __forceinline__ opmath_t load_scale(const opmath_t* ptr, opmath_t value) {
  return ptr != nullptr ? *ptr : value;
}

template <bool kZeroNonfinite, typename T, typename opmath_t>
__global__ void __launch_bounds__(kBlockThreads)
    scale_flat_kernel(const __grid_constant__ ChunkTable tab, const opmath_t* scale_ptr, opmath_t scale_value) {
  constexpr int V = Vec16<T>::kSize;
  constexpr int kUnroll = 4;
  int slot;
  int64_t chunk;
  locate_chunk(tab, blockIdx.x, slot, chunk);
  const int64_t begin = chunk * kChunk;
  const int n = static_cast<int>(::min(kChunk, tab.numel[slot] - begin));
  T* x = static_cast<T*>(const_cast<void*>(tab.addr[slot])) + begin;
  const opmath_t s = load_scale(scale_ptr, scale_value);
  if (!kZeroNonfinite && s == opmath_t(1)) return;
  const int tid = threadIdx.x;
  const int head = head_elements(x, n);
  for (int i = tid; i < head; i += kBlockThreads) x[i] = scaled<kZeroNonfinite>(x[i], s);
  auto* xv = reinterpret_cast<Vec16<T>*>(x + head);
  const int nv = (n - head) / V;
  for (int base = tid; base < nv; base += kBlockThreads * kUnroll) {
    Vec16<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kBlockThreads;
      if (i < nv) buf[u] = xv[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kBlockThreads;
      if (i < nv) {
#pragma unroll
        for (int k = 0; k < V; ++k) buf[u].v[k] = scaled<kZeroNonfinite>(buf[u].v[k], s);
        xv[i] = buf[u];
      }
    }
  }
  for (int i = head + nv * V + tid; i < n; i += kBlockThreads) x[i] = scaled<kZeroNonfinite>(x[i], s);
}

template <bool kZeroNonfinite, typename T, typename opmath_t>
__global__ void __launch_bounds__(kBlockThreads)
    scale_strided_kernel(T* base, const __grid_constant__ StridedLayout layout, int64_t numel,
                         const opmath_t* scale_ptr, opmath_t scale_value) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int n = static_cast<int>(::min(kChunk, numel - begin));
  const opmath_t s = load_scale(scale_ptr, scale_value);
  if (!kZeroNonfinite && s == opmath_t(1)) return;
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    T* p = base + strided_offset(layout, begin + i);
    *p = scaled<kZeroNonfinite>(*p, s);
  }
}

template <bool kZeroNonfinite>
void scale_list(const char* op, at::TensorList tensors, const at::Tensor& scale) {
  check_scale_kind(op, scale);
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  const auto dtype = tensors[0].scalar_type();
  TORCH_CHECK(scale.is_cpu() || scale.device() == device, op, ": `scale` is on ", scale.device(),
              " but the tensors are on ", device);
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device() == device, op, " (CUDA kernel): tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", device, "; every tensor of one call must be on one device");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] is not a strided (dense) tensor");
    // Every tensor is checked before the first launch: a refusal leaves the whole list untouched
    // (the overlap check ran inside the launch loop, after earlier tensors' kernels were queued).
    check_scaled_tensor(op, i, t, dtype);
  }
  check_scaled_dtype(op, tensors);
  const c10::cuda::CUDAGuard guard(device);
  require_kernel_image();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_scale_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor scale_dev;
    const opmath_t* scale_ptr = nullptr;
    opmath_t scale_value = 0;
    if (scale.is_cpu()) {
      const double s = scale.to(at::kDouble).item<double>();  // host memory: no sync
      if (!kZeroNonfinite && s == 1.0) return;
      scale_value = static_cast<opmath_t>(op_math_scale(scale, s, dtype));  // as the CPU kernel
    } else {
      // A device-side cast (no-op when the dtype already matches): the value stays on the GPU.
      scale_dev = scale.reshape({}).to(c10::CppTypeToScalarType<opmath_t>::value);
      // A scale in the storage of a tensor it scales is copied first: every block reads it
      // from memory, and the block that owns it writes x*s there (later blocks then read s*s).
      // The CPU kernel and the reference read it once before writing.
      if (shares_storage(scale_dev, tensors)) scale_dev = scale_dev.clone();
      scale_ptr = scale_dev.const_data_ptr<opmath_t>();
    }
    // Written in place without torch's in-place machinery: bump the version counters as it
    // would (before any write: an inference tensor outside inference mode is refused untouched).
    for (const auto& t : tensors) t.unsafeGetTensorImpl()->bump_version();
    const auto launch = [&](const ChunkTable& tab, int64_t nblocks) {
      scale_flat_kernel<kZeroNonfinite, scalar_t, opmath_t>
          <<<static_cast<unsigned>(nblocks), kBlockThreads, 0, stream>>>(tab, scale_ptr, scale_value);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Tensors sharing memory (one gradient listed twice, a view and its base) are scaled one
    // after the other, each wholly, in list order, as the CPU kernel runs them (memory_spans.h):
    // in one launch their blocks would race over the shared elements, and a copied view (more
    // than 25 dims) written back last would overwrite what the others had scaled.
    const bool in_order = tensors.size() > 1 && spans_overlap(tensors);
    std::vector<FlatItem> flat;
    std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (view, contiguous copy)
    for (const auto i : c10::irange(tensors.size())) {
      const at::Tensor& t = tensors[i];
      const int64_t numel = t.numel();
      if (numel == 0) continue;
      if (t.is_non_overlapping_and_dense()) {
        const FlatItem item{t.data_ptr(), numel, chunks_of(numel), static_cast<int32_t>(i)};
        if (in_order) {
          for_each_launch(std::vector<FlatItem>{item}, launch);
        } else {
          flat.push_back(item);
        }
        continue;
      }
      const StridedWalk walk(t);
      if (walk.sizes.size() <= static_cast<size_t>(kMaxDims)) {
        StridedLayout layout{};
        layout.ndim = static_cast<int32_t>(walk.sizes.size());
        for (const auto d : c10::irange(walk.sizes.size())) {
          layout.sizes[d] = walk.sizes[d];
          layout.strides[d] = walk.strides[d];
        }
        scale_strided_kernel<kZeroNonfinite, scalar_t, opmath_t>
            <<<static_cast<unsigned>(chunks_of(numel)), kBlockThreads, 0, stream>>>(
                static_cast<scalar_t*>(t.data_ptr()), layout, numel, scale_ptr, scale_value);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        // More than 25 non-mergeable dims: scale a device copy and copy it back (no host sync),
        // slice by slice where torch's own copy refuses the dims (copy_any_dims.h).
        at::Tensor c = contiguous_any_dims(t);
        const FlatItem item{c.data_ptr(), numel, chunks_of(numel), static_cast<int32_t>(i)};
        if (in_order) {
          for_each_launch(std::vector<FlatItem>{item}, launch);
          copy_any_dims(t, c);
        } else {
          flat.push_back(item);
          write_back.emplace_back(t, c);
        }
      }
    }
    for_each_launch(flat, launch);
    for (auto& [view, copy] : write_back) copy_any_dims(view, copy);
  });
}

void maybe_scale_cuda(at::TensorList tensors, const at::Tensor& scale) {
  scale_list<false>("gradguard.maybe_scale_", tensors, scale);
}

void zero_nonfinite_and_scale_cuda(at::TensorList tensors, const at::Tensor& scale) {
  scale_list<true>("gradguard.zero_nonfinite_and_scale_", tensors, scale);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(gradguard, CUDA, m) {
  m.impl("maybe_scale_", &cuda::maybe_scale_cuda);
  m.impl("zero_nonfinite_and_scale_", &cuda::zero_nonfinite_and_scale_cuda);
}

}  // namespace gradguard

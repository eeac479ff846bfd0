// gradguard::multi_tensor_stats on CUDA: one read pass over a list of same-dtype tensors giving,
// per tensor, the sum of (|x| / amax)^p over the finite elements (the contract is in
// gradguard/_ops.py), the NaN and Inf counts and the largest finite |x|.
//
// Two kernels, both on the current stream, no host sync and nothing copied from the host, so
// the op can be captured in a CUDA graph:
//  1. stats_*_kernel: one block per 64K-element chunk writes one Partial per chunk (and, from
//     each tensor's first chunk, where that tensor's partials are);
//  2. stats_finish_kernel: one block per tensor reduces its partials in a fixed order.
// Every reduction has a fixed shape (no atomics), so results are bitwise reproducible.
//
// Accumulation: float for float/half/bfloat16 input, with one float sum per vector lane; a chunk
// whose float sum overflowed or went below where float squares lose precision is summed again
// in double (a float32 gradient of 1e20 has norm 1e20). float64 input and generic p use double.
// Finiteness is decided per element (|x| <= max), never from an overflowed sum.
// Normalization: each chunk's raw sum is divided by the chunk's amax^p; where the raw sum left
// double's safe range (float64 input above ~1e154 or below ~1e-140, or a large p), the chunk is
// summed again as (|x| / amax)^p, which cannot overflow. The finishing kernel rescales each
// chunk's sum to the tensor's amax by (chunk amax / amax)^p <= 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "copy_any_dims.h"
#include "kernel_dtypes.h"
#include "kernel_image.h"
#include "multi_tensor_apply.cuh"
#include "strided_walk.h"

namespace gradguard {
namespace cuda {
namespace {

enum class Norm { L1, L2, Inf, Generic };

// One chunk's result, written by a single thread; 32 bytes so a warp reads them coalesced.
struct Partial {
  double acc;
  double amax;
  long long nan;
  long long nonfinite;  // NaN and Inf together
};

// Where a tensor's partials sit in the partial buffer; written on the device by the tensor's
// first chunk, so the finishing kernel needs no metadata from the host.
struct Span {
  long long first;
  long long count;
};

struct Stats {
  double s;
  double m;
  long long nan;
  long long nonfinite;
};

template <typename T, Norm N>
using acc_type = std::conditional_t<std::is_same_v<T, double> || N == Norm::Generic, double, float>;

template <typename T>
__device__ __forceinline__ T abs_(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return ::fabs(v);
  } else {
    return ::fabsf(v);
  }
}

template <typename T>
__device__ __forceinline__ T max_(T a, T b) {
  if constexpr (std::is_same_v<T, double>) {
    return ::fmax(a, b);
  } else {
    return ::fmaxf(a, b);
  }
}

// Per-thread accumulators: L independent sums (add chains that overlap, and float sums of <= 32
// terms for float32 input), one max and two counts. 4 sums, not one per 16-byte lane: 8 for
// half/bfloat16 pushed the kernel to ~96 registers (one 512-thread block per SM).
template <typename acc_t, Norm N, int L>
struct Lanes {
  acc_t s[L];
  acc_t m = 0;
  int nan = 0;
  int nonfinite = 0;

  __device__ __forceinline__ Lanes() {
#pragma unroll
    for (int k = 0; k < L; ++k) s[k] = 0;
  }

  __device__ __forceinline__ void add(int k, acc_t v, acc_t p) {
    const acc_t a = abs_(v);
    const bool finite = a <= std::numeric_limits<acc_t>::max();  // false for NaN too
    nan += (v != v);
    nonfinite += !finite;
    const acc_t af = finite ? a : acc_t(0);
    if constexpr (N == Norm::L1) {
      s[k] += af;
    } else if constexpr (N == Norm::L2) {
      s[k] += af * af;
    } else if constexpr (N == Norm::Generic) {
      s[k] += ::pow(af, p);
    }
    m = max_(m, af);
  }

  __device__ __forceinline__ Stats merge() const {
    Stats r{0.0, static_cast<double>(m), nan, nonfinite};
#pragma unroll
    for (int k = 0; k < L; ++k) r.s += static_cast<double>(s[k]);
    return r;
  }
};

// kDivide: every element is divided by `div` (the chunk's amax) before it is summed.
template <typename T, typename acc_t, Norm N, bool kDivide = false>
__device__ Stats flat_thread_stats(const T* x, int n, acc_t p, acc_t div = acc_t(1)) {
  constexpr int V = Vec16<T>::kSize;
  constexpr int L = V < 4 ? V : 4;
  constexpr int kUnroll = 4;  // 4 x 16-byte loads in flight per thread
  Lanes<acc_t, N, L> acc;
  const int tid = threadIdx.x;
  const int head = head_elements(x, n);
  const auto load = [&](T v) { return kDivide ? static_cast<acc_t>(v) / div : static_cast<acc_t>(v); };
  for (int i = tid; i < head; i += kBlockThreads) acc.add(0, load(x[i]), p);
  const auto* xv = reinterpret_cast<const Vec16<T>*>(x + head);
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
      if (base + u * kBlockThreads < nv) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc.add(k % L, load(buf[u].v[k]), p);
      }
    }
  }
  for (int i = head + nv * V + tid; i < n; i += kBlockThreads) acc.add(0, load(x[i]), p);
  return acc.merge();
}

template <typename T, typename acc_t, Norm N, bool kDivide = false>
__device__ Stats strided_thread_stats(const T* base, const StridedLayout& layout, int64_t begin, int n,
                                      acc_t p, acc_t div = acc_t(1)) {
  Lanes<acc_t, N, 1> acc;
  for (int i = threadIdx.x; i < n; i += kBlockThreads) {
    const acc_t v = static_cast<acc_t>(base[strided_offset(layout, begin + i)]);
    acc.add(0, kDivide ? v / div : v, p);
  }
  return acc.merge();
}

__device__ __forceinline__ Stats combine(const Stats& a, const Stats& b) {
  return {a.s + b.s, ::fmax(a.m, b.m), a.nan + b.nan, a.nonfinite + b.nonfinite};
}

__device__ __forceinline__ Stats shfl_down(const Stats& r, int offset) {
  return {__shfl_down_sync(0xffffffffu, r.s, offset), __shfl_down_sync(0xffffffffu, r.m, offset),
          __shfl_down_sync(0xffffffffu, r.nan, offset), __shfl_down_sync(0xffffffffu, r.nonfinite, offset)};
}

// Fixed-shape tree (warp shuffles, then the first warp over the warp results): the same inputs
// give the same bits on every run. The result is returned to every thread of the block.
template <int kThreads>
__device__ Stats block_reduce(Stats r, Stats* smem) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) r = combine(r, shfl_down(r, off));
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < kWarps ? smem[lane] : Stats{0.0, 0.0, 0, 0};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) r = combine(r, shfl_down(r, off));
    if (lane == 0) smem[0] = r;
  }
  __syncthreads();
  return smem[0];
}

// Float squares overflow above ~1.8e19 and lose precision below ~1e-19 (subnormal results);
// above 1e-25 a chunk's sum is large enough that what underflowed (<= 65536 terms of < 1.2e-38)
// is below 1e-8 of it.
template <typename acc_t, Norm N>
__device__ __forceinline__ bool needs_double(const Stats& r) {
  if constexpr (!std::is_same_v<acc_t, float> || !(N == Norm::L1 || N == Norm::L2)) {
    return false;
  } else {
    const bool overflowed = !(r.s <= static_cast<double>(std::numeric_limits<float>::max()));
    const bool underflowed = N == Norm::L2 && r.m > 0.0 && r.s < 1e-25;
    return overflowed || underflowed;
  }
}

// The rare double pass, kept out of line so that its registers do not count against the
// float fast path (inlined, it made the half/bfloat16 kernels spill).
template <typename T, Norm N>
__device__ __noinline__ double flat_chunk_sum_double(const T* x, int n, double p, Stats* smem) {
  return block_reduce<kBlockThreads>(flat_thread_stats<T, double, N>(x, n, p), smem).s;
}

template <Norm N>
__device__ __forceinline__ double ratio_pow(double r, double p) {
  if constexpr (N == Norm::L1) {
    return r;
  } else if constexpr (N == Norm::L2) {
    return r * r;
  } else {
    return ::pow(r, p);
  }
}

// A raw double sum s >= amax^p that is finite and above 1e-280 divides by amax^p exactly to
// rounding, and what underflowed in it (< 65536 terms below 2.3e-308) weighs < 1e-22 of it.
template <Norm N>
__device__ __forceinline__ bool raw_sum_normalizes(double s, double m) {
  return N == Norm::Inf || m == 0.0 || (s <= 1.7976931348623157e308 && s >= 1e-280);
}

// The rare pass that sums (|x| / amax)^p directly, out of line like the double pass above.
template <typename T, Norm N>
__device__ __noinline__ double flat_chunk_sum_scaled(const T* x, int n, double p, double m, Stats* smem) {
  return block_reduce<kBlockThreads>(flat_thread_stats<T, double, N, true>(x, n, p, m), smem).s;
}

template <Norm N>
__device__ __forceinline__ double normalized(double s, double m, double p) {
  if (N == Norm::Inf) return m > 0.0 ? 1.0 : 0.0;
  return m > 0.0 ? s / ratio_pow<N>(m, p) : 0.0;
}

__device__ __forceinline__ void write_partial(const Stats& r, int64_t global_chunk, int64_t chunk, int64_t nchunks,
                                              int32_t index, Partial* parts, Span* spans) {
  if (threadIdx.x != 0) return;
  parts[global_chunk] = Partial{r.s, r.m, r.nan, r.nonfinite};
  if (chunk == 0) spans[index] = Span{global_chunk, nchunks};
}

// Two resident blocks per SM (<= 64 registers) keep 64 KB of loads in flight per SM.
template <typename T, Norm N>
__global__ void __launch_bounds__(kBlockThreads, 2)
    stats_flat_kernel(const __grid_constant__ ChunkTable tab, double p, Partial* parts, Span* spans) {
  using acc_t = acc_type<T, N>;
  __shared__ Stats smem[kBlockThreads / 32];
  int slot;
  int64_t chunk;
  locate_chunk(tab, blockIdx.x, slot, chunk);
  const int64_t begin = chunk * kChunk;
  const int n = static_cast<int>(::min(kChunk, tab.numel[slot] - begin));
  const T* x = static_cast<const T*>(tab.addr[slot]) + begin;
  Stats r = block_reduce<kBlockThreads>(flat_thread_stats<T, acc_t, N>(x, n, static_cast<acc_t>(p)), smem);
  if (needs_double<acc_t, N>(r)) {  // block-uniform: every thread holds the same r
    r.s = flat_chunk_sum_double<T, N>(x, n, p, smem);
  }
  r.s = raw_sum_normalizes<N>(r.s, r.m) ? normalized<N>(r.s, r.m, p) : flat_chunk_sum_scaled<T, N>(x, n, p, r.m, smem);
  const int64_t nchunks = tab.chunk_end[slot] - (slot == 0 ? 0 : tab.chunk_end[slot - 1]);
  write_partial(r, tab.first_chunk + blockIdx.x, chunk, nchunks, tab.index[slot], parts, spans);
}

template <typename T, Norm N>
__global__ void __launch_bounds__(kBlockThreads)
    stats_strided_kernel(const T* base, const __grid_constant__ StridedLayout layout, int64_t numel,
                         int64_t first_chunk, int32_t index, double p, Partial* parts, Span* spans) {
  using acc_t = acc_type<T, N>;
  __shared__ Stats smem[kBlockThreads / 32];
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kChunk;
  const int n = static_cast<int>(::min(kChunk, numel - begin));
  Stats r = block_reduce<kBlockThreads>(
      strided_thread_stats<T, acc_t, N>(base, layout, begin, n, static_cast<acc_t>(p)), smem);
  if (needs_double<acc_t, N>(r)) {
    r.s = block_reduce<kBlockThreads>(strided_thread_stats<T, double, N>(base, layout, begin, n, p), smem).s;
  }
  if (raw_sum_normalizes<N>(r.s, r.m)) {
    r.s = normalized<N>(r.s, r.m, p);
  } else {
    r.s = block_reduce<kBlockThreads>(strided_thread_stats<T, double, N, true>(base, layout, begin, n, p, r.m),
                                      smem).s;
  }
  write_partial(r, first_chunk + chunk, chunk, gridDim.x, index, parts, spans);
}

constexpr int kFinishThreads = 256;

// Two fixed-order passes over a tensor's partials: the amax and counts, then each chunk's
// normalized sum rescaled to that amax.
template <Norm N>
__global__ void __launch_bounds__(kFinishThreads)
    stats_finish_kernel(const Partial* parts, const Span* spans, double p, double* acc, long long* nan_count,
                        long long* inf_count, double* amax) {
  __shared__ Stats smem[kFinishThreads / 32];
  const Span sp = spans[blockIdx.x];
  Stats r{0.0, 0.0, 0, 0};
  for (long long j = threadIdx.x; j < sp.count; j += kFinishThreads) {
    const Partial q = parts[sp.first + j];
    r = combine(r, Stats{0.0, q.amax, q.nan, q.nonfinite});
  }
  r = block_reduce<kFinishThreads>(r, smem);
  const double m = r.m;
  Stats t{0.0, 0.0, 0, 0};
  if (N != Norm::Inf && m > 0.0) {
    for (long long j = threadIdx.x; j < sp.count; j += kFinishThreads) {
      const Partial q = parts[sp.first + j];
      if (q.amax > 0.0) t.s += q.acc * ratio_pow<N>(q.amax / m, p);
    }
  }
  t = block_reduce<kFinishThreads>(t, smem);
  if (threadIdx.x == 0) {
    acc[blockIdx.x] = N == Norm::Inf ? (m > 0.0 ? 1.0 : 0.0) : t.s;
    amax[blockIdx.x] = r.m;
    nan_count[blockIdx.x] = r.nan;
    inf_count[blockIdx.x] = r.nonfinite - r.nan;
  }
}

struct StridedItem {
  const void* ptr;
  StridedLayout layout;
  int64_t numel;
  int64_t nchunks;
  int32_t index;
};

template <typename T, Norm N>
void launch_stats(const std::vector<FlatItem>& flat, const std::vector<StridedItem>& strided, int64_t n, double p,
                  Partial* parts, Span* spans, at::Tensor& acc, at::Tensor& nan_count, at::Tensor& inf_count,
                  at::Tensor& amax) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t next_chunk = 0;
  for_each_launch(flat, [&](const ChunkTable& tab, int64_t nblocks) {
    stats_flat_kernel<T, N><<<static_cast<unsigned>(nblocks), kBlockThreads, 0, stream>>>(tab, p, parts, spans);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    next_chunk += nblocks;
  });
  for (const StridedItem& it : strided) {
    stats_strided_kernel<T, N><<<static_cast<unsigned>(it.nchunks), kBlockThreads, 0, stream>>>(
        static_cast<const T*>(it.ptr), it.layout, it.numel, next_chunk, it.index, p, parts, spans);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    next_chunk += it.nchunks;
  }
  auto* acc_p = acc.mutable_data_ptr<double>();
  auto* amax_p = amax.mutable_data_ptr<double>();
  auto* nan_p = reinterpret_cast<long long*>(nan_count.mutable_data_ptr<int64_t>());
  auto* inf_p = reinterpret_cast<long long*>(inf_count.mutable_data_ptr<int64_t>());
  stats_finish_kernel<N><<<static_cast<unsigned>(n), kFinishThreads, 0, stream>>>(parts, spans, p, acc_p, nan_p,
                                                                                    inf_p, amax_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_tensor_stats_cuda(at::TensorList tensors,
                                                                                   double norm_type) {
  TORCH_CHECK(!tensors.empty(), "gradguard.multi_tensor_stats: `tensors` must not be empty");
  TORCH_CHECK_VALUE(norm_type > 0.0, "gradguard.multi_tensor_stats: `norm_type` must be > 0, got ", norm_type);
  const at::Device device = tensors[0].device();
  const auto dtype = tensors[0].scalar_type();
  for (const auto i : c10::irange(tensors.size())) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device() == device, "gradguard.multi_tensor_stats (CUDA kernel): tensors[", i, "] is on ",
                t.device(), " but tensors[0] is on ", device, "; group tensors by device before calling the op");
    TORCH_CHECK(t.scalar_type() == dtype, "gradguard.multi_tensor_stats: tensors[", i, "] has dtype ",
                t.scalar_type(), " but tensors[0] has ", dtype, "; group tensors by dtype before calling the op");
    TORCH_CHECK(t.layout() == at::kStrided, "gradguard.multi_tensor_stats: tensors[", i,
                "] is not a strided (dense) tensor; pass the values of a sparse tensor instead");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(is_kernel_dtype(dtype), "gradguard.multi_tensor_stats: dtype ", dtype,
                              " is not supported; the op takes float16, bfloat16, float32 and float64 tensors");
  TORCH_CHECK(tensors.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "gradguard.multi_tensor_stats: too many tensors");
  const c10::cuda::CUDAGuard guard(device);
  require_kernel_image();
  const int64_t n = static_cast<int64_t>(tensors.size());

  std::vector<FlatItem> flat;
  std::vector<StridedItem> strided;
  std::vector<at::Tensor> keep_alive;  // contiguous copies of views with more than kMaxDims dims
  flat.reserve(tensors.size());
  int64_t total_chunks = 0;
  for (const auto i : c10::irange(tensors.size())) {
    const at::Tensor& t = tensors[i];
    const int64_t numel = t.numel();
    // An empty tensor still gets one (empty) chunk, so its outputs are written like any other's.
    const int64_t nchunks = std::max<int64_t>(1, chunks_of(numel));
    total_chunks += nchunks;
    const int32_t index = static_cast<int32_t>(i);
    if (numel == 0 || t.is_non_overlapping_and_dense()) {
      flat.push_back({t.const_data_ptr(), numel, nchunks, index});
      continue;
    }
    const StridedWalk walk(t);
    if (walk.sizes.size() <= static_cast<size_t>(kMaxDims)) {
      StridedItem it{t.const_data_ptr(), {}, numel, nchunks, index};
      it.layout.ndim = static_cast<int32_t>(walk.sizes.size());
      for (const auto d : c10::irange(walk.sizes.size())) {
        it.layout.sizes[d] = walk.sizes[d];
        it.layout.strides[d] = walk.strides[d];
      }
      strided.push_back(it);
    } else {
      // Views with more than 25 non-mergeable dims: a device copy (no host sync), made slice by
      // slice where torch's own copy refuses the dims (copy_any_dims.h).
      keep_alive.push_back(contiguous_any_dims(t));
      flat.push_back({keep_alive.back().const_data_ptr(), numel, nchunks, index});
    }
  }

  const auto opts = at::TensorOptions().device(device);
  at::Tensor parts = at::empty({total_chunks * static_cast<int64_t>(sizeof(Partial) / sizeof(double))},
                               opts.dtype(at::kDouble));
  at::Tensor spans = at::empty({n * 2}, opts.dtype(at::kLong));
  at::Tensor acc = at::empty({n}, opts.dtype(at::kDouble)), amax = at::empty({n}, opts.dtype(at::kDouble));
  at::Tensor nan_count = at::empty({n}, opts.dtype(at::kLong)), inf_count = at::empty({n}, opts.dtype(at::kLong));
  auto* parts_p = reinterpret_cast<Partial*>(parts.mutable_data_ptr<double>());
  auto* spans_p = reinterpret_cast<Span*>(spans.mutable_data_ptr<int64_t>());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_multi_tensor_stats_cuda", [&] {
    if (norm_type == 2.0) {
      launch_stats<scalar_t, Norm::L2>(flat, strided, n, norm_type, parts_p, spans_p, acc, nan_count, inf_count, amax);
    } else if (norm_type == 1.0) {
      launch_stats<scalar_t, Norm::L1>(flat, strided, n, norm_type, parts_p, spans_p, acc, nan_count, inf_count, amax);
    } else if (std::isinf(norm_type)) {
      launch_stats<scalar_t, Norm::Inf>(flat, strided, n, norm_type, parts_p, spans_p, acc, nan_count, inf_count, amax);
    } else {
      launch_stats<scalar_t, Norm::Generic>(flat, strided, n, norm_type, parts_p, spans_p, acc, nan_count, inf_count,
                                            amax);
    }
  });
  return {acc, nan_count, inf_count, amax};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(gradguard, CUDA, m) {
  m.impl("multi_tensor_stats", &cuda::multi_tensor_stats_cuda);
}

}  // namespace gradguard

// Multi-tensor launches for gradguard's CUDA kernels.
//
// A list of tensors is cut into fixed chunks of kChunk elements and every chunk gets one block.
// Each launch carries a table of up to kMaxTensorsPerLaunch tensors (pointer, numel, cumulative
// chunk count) as a by-value kernel argument, so no metadata is copied to the device (a
// host-to-device copy would either sync or, under graph capture, read a host buffer at replay).
// A block finds its tensor by a binary search over the cumulative chunk counts, which keeps a
// launch limited by tensors only: a tensor is never split between launches and one launch covers
// any number of chunks, so a 1.5B-element list of a few hundred tensors is one launch and there
// is no per-launch tail wave per few thousand blocks.
//
// Tensors whose elements fill one span of memory (contiguous, transposed, permuted:
// is_non_overlapping_and_dense) are treated as flat arrays: statistics and in-place scaling do
// not depend on element order. Other views (slices with steps, expanded dims) are walked element
// by element through their strides by a per-tensor launch (StridedLayout), never copied.
//
// Offsets inside a chunk fit in 32 bits; chunk bases are 64-bit, so tensors of more than 2^31
// elements are fine.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace gradguard {
namespace cuda {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int kBlockThreads = 512;

// CUDA 12.1 raised the kernel-argument limit from 4 KB to 32 KB (driver >= 530, sm_70+). A CUDA
// 13 build can only run on drivers >= 580, so there the large table is always safe; older
// toolkits get the table that fits in 4 KB.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000
constexpr int kMaxTensorsPerLaunch = 1000;
#else
constexpr int kMaxTensorsPerLaunch = 140;
#endif

// Grid x is limited to 2^31 - 1 blocks.
constexpr int64_t kMaxChunksPerLaunch = (int64_t(1) << 31) - 1;

struct ChunkTable {
  const void* addr[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int64_t chunk_end[kMaxTensorsPerLaunch];  // cumulative chunk count within this launch
  int32_t index[kMaxTensorsPerLaunch];      // position of the tensor in the op's input list
  int64_t first_chunk;                      // global chunk number of this launch's first block
  int32_t ntensors;
};
static_assert(sizeof(ChunkTable) <= (kMaxTensorsPerLaunch > 200 ? 32764 : 4096),
              "ChunkTable exceeds the kernel-argument limit");

// The block's tensor slot and chunk within that tensor. Every thread of a block computes the same
// answer from the constant bank, so no shared memory or barrier is needed.
__device__ __forceinline__ void locate_chunk(const ChunkTable& tab, int64_t block, int& slot,
                                             int64_t& chunk) {
  int lo = 0, hi = tab.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tab.chunk_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  slot = lo;
  chunk = block - (lo == 0 ? 0 : tab.chunk_end[lo - 1]);
}

struct FlatItem {
  const void* ptr;
  int64_t numel;
  int64_t nchunks;  // >= 1 for the stats op (an empty tensor still reports zeros), 0 => skipped
  int32_t index;
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Calls launch(table, nblocks) for consecutive batches of `items`; table.first_chunk numbers the
// chunks of all launches consecutively in item order.
template <typename Launch>
void for_each_launch(const std::vector<FlatItem>& items, Launch&& launch) {
  ChunkTable tab;
  int32_t slots = 0;
  int64_t chunks = 0;
  int64_t first_chunk = 0;
  auto flush = [&] {
    if (slots == 0) return;
    tab.ntensors = slots;
    tab.first_chunk = first_chunk;
    launch(tab, chunks);
    first_chunk += chunks;
    slots = 0;
    chunks = 0;
  };
  for (const FlatItem& it : items) {
    if (it.nchunks == 0) continue;
    TORCH_CHECK(it.nchunks <= kMaxChunksPerLaunch, "gradguard: tensor of ", it.numel, " elements is too large");
    if (slots == kMaxTensorsPerLaunch || chunks + it.nchunks > kMaxChunksPerLaunch) flush();
    tab.addr[slots] = it.ptr;
    tab.numel[slots] = it.numel;
    tab.index[slots] = it.index;
    chunks += it.nchunks;
    tab.chunk_end[slots] = chunks;
    ++slots;
  }
  flush();
}

// Strides of a view that is not one dense span, outermost dim first, in elements. 25 dims is
// TensorIterator's limit too; after merging mergeable dims real tensors use a handful.
constexpr int kMaxDims = 25;

struct StridedLayout {
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
  int32_t ndim;
};

__device__ __forceinline__ int64_t strided_offset(const StridedLayout& l, int64_t linear) {
  int64_t offset = 0;
  for (int d = l.ndim - 1; d > 0; --d) {
    const int64_t size = l.sizes[d];
    offset += (linear % size) * l.strides[d];
    linear /= size;
  }
  return offset + linear * l.strides[0];
}

// 16-byte vector of T for LDG.128 / STG.128.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Elements to handle one by one before `p` reaches a 16-byte boundary; all of `n` when the
// pointer is not even aligned to its element size (then no vector access is safe).
template <typename T>
__device__ __forceinline__ int head_elements(const T* p, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return n;
  const int head = static_cast<int>(((16 - a % 16) % 16) / sizeof(T));
  return head < n ? head : n;
}

}  // namespace cuda
}  // namespace gradguard

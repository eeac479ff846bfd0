// require_kernel_image(): see kernel_image.h. Every .cu file of the extension is compiled with
// the same -gencode flags, so one probe kernel answers for all of them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

#include "kernel_image.h"

namespace gradguard {
namespace cuda {
namespace {

__global__ void probe_kernel() {}

constexpr int kMaxDevices = 256;
std::array<std::atomic<bool>, kMaxDevices> g_has_image{};  // static storage: all false

}  // namespace

void require_kernel_image() {
  const int dev = c10::cuda::current_device();
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && g_has_image[dev].load(std::memory_order_relaxed)) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err == cudaSuccess) {
    if (cached) g_has_image[dev].store(true, std::memory_order_relaxed);
    return;
  }
  (void)cudaGetLastError();  // not sticky: clear it, so that no later launch check reports it
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev);
  TORCH_CHECK(false, "gradguard: the compiled CUDA kernels cannot run on this GPU (", prop->name,
              ", compute capability ", prop->major, ".", prop->minor, "): ", cudaGetErrorString(err),
              ". They were built for the architectures in gradguard.backend()['build']['cuda_arch_list']; "
              "rebuild with TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor,
              "\" in the environment, or set GRADGUARD_DISABLE_EXT=1 to use the pure-PyTorch kernels");
}

}  // namespace cuda
}  // namespace gradguard

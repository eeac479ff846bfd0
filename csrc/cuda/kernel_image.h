// Whether this extension's CUDA code can run on the current device.
#pragma once

namespace gradguard {
namespace cuda {

// Raises a c10::Error that names the GPU, the build's architecture list and the two ways out
// (rebuild for this GPU, or GRADGUARD_DISABLE_EXT=1), where the current device has no kernel
// image of this extension: a GPU outside the build's TORCH_CUDA_ARCH_LIST (and older than its
// PTX) would otherwise fail at the first launch with CUDA's "no kernel image is available",
// which names neither gradguard nor a remedy. Checked once per device; after that one atomic load.
void require_kernel_image();

}  // namespace cuda
}  // namespace gradguard

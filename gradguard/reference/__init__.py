"""Pure-PyTorch kernels of every gradguard op.

They are registered as the default kernel of each dispatcher op (used wherever no compiled kernel
is registered for the device, and everywhere under ``GRADGUARD_DISABLE_EXT=1``), and they are the
test oracle: straightforward float64 code, written for clarity rather than speed.
"""
from gradguard.reference.stats import maybe_scale_, multi_tensor_stats, zero_nonfinite_and_scale_

__all__ = ["maybe_scale_", "multi_tensor_stats", "zero_nonfinite_and_scale_"]

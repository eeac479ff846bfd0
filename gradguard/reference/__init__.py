"""Pure-PyTorch kernels of every gradguard op.

They are registered as the default kernel of each dispatcher op (used wherever no compiled kernel
is registered for the device, and everywhere under ``GRADGUARD_DISABLE_EXT=1``), and they are the
test oracle: straightforward float64 code, written for clarity rather than speed.
"""
from gradguard.reference.safe_math import (
    safe_div,
    safe_div_backward,
    safe_exp,
    safe_exp_backward,
    safe_log,
    safe_log_backward,
    safe_sqrt,
    safe_sqrt_backward,
)
from gradguard.reference import decide
from gradguard.reference.decide import guard_decide
from gradguard.reference.fused_adam import fused_adam_readonly_grads_
from gradguard.reference.stats import check_scale_args, maybe_scale_, multi_tensor_stats, zero_nonfinite_and_scale_

__all__ = [
    "decide",
    "fused_adam_readonly_grads_",
    "guard_decide",
    "check_scale_args",
    "maybe_scale_",
    "multi_tensor_stats",
    "safe_div",
    "safe_div_backward",
    "safe_exp",
    "safe_exp_backward",
    "safe_log",
    "safe_log_backward",
    "safe_sqrt",
    "safe_sqrt_backward",
    "zero_nonfinite_and_scale_",
]

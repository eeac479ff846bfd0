"""The gradguard dispatcher ops: schemas, fake (meta) kernels, and the reference kernels
registered as each op's default implementation.

Compiled kernels (``gradguard._C``) register CPU and CUDA implementations of these same ops with
``TORCH_LIBRARY_IMPL``; the dispatcher picks them over the default where they exist. The public
API in ``gradguard.stats`` only ever calls ``torch.ops.gradguard.*``.
"""
from __future__ import annotations

import torch

from gradguard import reference

_lib = torch.library.Library("gradguard", "DEF")

# All tensors of one call share a device and a dtype (the Python API groups them); a tensor on
# another device (meta included) is an error. Outputs, each of shape [len(tensors)] on
# tensors[0]'s device, per tensor x:
#   acc  float64  sum over the finite elements of (|x| / amax)^p; 0 when amax is 0; for p = inf,
#                 1 when amax > 0. Normalized so that it never overflows (it lies in [1, numel]):
#                 the norm is amax * acc^(1/p), computed in float64 by gradguard.stats, and a norm
#                 above float64's range is inf there, never a wrong finite number.
#   nan, inf  int64   the NaN and +-Inf element counts;
#   amax float64  the largest finite |x| (0 if none).
# Results of shards of the same tensors merge exactly: gradguard.stats.merge_shard_stats.
_lib.define("multi_tensor_stats(Tensor[] tensors, float norm_type) -> (Tensor, Tensor, Tensor, Tensor)")
# Both mutate every tensor of the list in place; `scale` is a 0-dim tensor on their device, so the
# factor never visits the host. maybe_scale_ writes nothing when scale is exactly 1 (an unclipped
# or skipped step leaves the grads' bits untouched); zero_nonfinite_and_scale_ also sets NaN/Inf
# elements to 0 in the same pass.
_lib.define("maybe_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()")
_lib.define("zero_nonfinite_and_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()")

torch.library.impl("gradguard::multi_tensor_stats", "default", lib=_lib)(reference.multi_tensor_stats)
torch.library.impl("gradguard::maybe_scale_", "default", lib=_lib)(reference.maybe_scale_)
torch.library.impl("gradguard::zero_nonfinite_and_scale_", "default", lib=_lib)(
    reference.zero_nonfinite_and_scale_
)


def _check_one_device(op: str, tensors, scale=None) -> None:
    # A meta tensor mixed with real ones dispatches here (Meta outranks CPU/CUDA): without this
    # check the op would return uninitialized memory or write nothing. torch.add raises; so do we.
    for i, t in enumerate(tensors):
        torch._check(t.device == tensors[0].device, lambda: (
            f"gradguard.{op}: tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}; "
            "every tensor of one call must be on the same device"))
    if scale is not None and tensors:
        torch._check(scale.device.type != "meta" or tensors[0].device.type == "meta", lambda: (
            f"gradguard.{op}: `scale` is on {scale.device} but the tensors are on {tensors[0].device}"))


@torch.library.register_fake("gradguard::multi_tensor_stats", lib=_lib)
def _multi_tensor_stats_fake(tensors, norm_type):
    torch._check(len(tensors) > 0, lambda: "gradguard.multi_tensor_stats: `tensors` must not be empty")
    _check_one_device("multi_tensor_stats", tensors)
    n = len(tensors)
    t0 = tensors[0]
    return (
        t0.new_empty((n,), dtype=torch.float64),
        t0.new_empty((n,), dtype=torch.int64),
        t0.new_empty((n,), dtype=torch.int64),
        t0.new_empty((n,), dtype=torch.float64),
    )


@torch.library.register_fake("gradguard::maybe_scale_", lib=_lib)
def _maybe_scale_fake(tensors, scale):
    _check_one_device("maybe_scale_", tensors, scale)
    return None


@torch.library.register_fake("gradguard::zero_nonfinite_and_scale_", lib=_lib)
def _zero_nonfinite_and_scale_fake(tensors, scale):
    _check_one_device("zero_nonfinite_and_scale_", tensors, scale)
    return None

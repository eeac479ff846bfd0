"""Reference kernels of the multi-tensor statistics ops (float64 math, one tensor at a time)."""
from __future__ import annotations

import math

import torch


def multi_tensor_stats(tensors: list[torch.Tensor], norm_type: float):
    """Per tensor: sum of |x|^p over finite elements (max |x| for p = inf), NaN count, Inf count,
    and the largest finite |x|. Returns four tensors of shape [n] on tensors[0]'s device:
    float64, int64, int64, float64.
    """
    if len(tensors) == 0:
        raise ValueError("gradguard.multi_tensor_stats: `tensors` must not be empty")
    device = tensors[0].device
    acc, nan_count, inf_count, amax = [], [], [], []
    for t in tensors:
        x = t.detach().to(torch.float64).reshape(-1)
        finite = torch.isfinite(x)
        a = torch.where(finite, x.abs(), torch.zeros((), dtype=torch.float64, device=x.device))
        m = a.max() if a.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
        if math.isinf(norm_type):
            s = m
        elif norm_type == 1.0:
            s = a.sum()
        elif norm_type == 2.0:
            s = (a * a).sum()
        else:
            s = a.pow(norm_type).sum()
        acc.append(s)
        amax.append(m)
        nan_count.append(torch.isnan(x).sum())
        inf_count.append(torch.isinf(x).sum())
    return (
        torch.stack(acc).to(device),
        torch.stack(nan_count).to(device=device, dtype=torch.int64),
        torch.stack(inf_count).to(device=device, dtype=torch.int64),
        torch.stack(amax).to(device),
    )


def zero_nonfinite_and_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: every non-finite element becomes 0, every other one is multiplied by `scale`."""
    for t in tensors:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(scale.to(t.device))


def maybe_scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """In place: every tensor times `scale`; nothing is written when `scale` is exactly 1.

    On the CPU the check is free. On a GPU, reading `scale` would be a host sync, so there the
    reference always multiplies (x * 1 keeps every value, though float16/bfloat16 NaN payloads may
    come back canonicalized); the compiled CUDA kernel makes the check on the device.
    """
    if not tensors:
        return
    if scale.device.type == "cpu" and scale.item() == 1.0:
        return
    torch._foreach_mul_(tensors, scale.to(tensors[0].device))

"""Reference (default kernel) of gradguard::fused_adam_readonly_grads_: PyTorch's own fused Adam/AdamW
kernel stepped on a copy of the gradients, so that the division by grad_scale it writes back lands
in the copy. Bit-identical to what the op specifies by construction, on any device PyTorch's
kernel runs on; it costs the copy the compiled CPU kernel exists to avoid (gradguard.fused_adam
uses that kernel only)."""
from __future__ import annotations

import torch


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10's is_non_overlapping_and_dense (not a Tensor method; torch._prims_common's spelling
    differs between releases): some permutation of the dimensions is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def refusal(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, found_inf) -> str:
    """What the compiled kernel refuses (csrc/cpu/adam_readonly_grads_cpu.cpp's
    fused_adam_readonly_grads_refusal, on any one device): "" when nothing. aten's fused kernel
    checks none of it: a gradient shorter than its parameter was read past its end (a wrong update,
    or a segmentation fault)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        return "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length"
    if grad_scale.dtype != torch.float32 or grad_scale.numel() != 1:
        return "grad_scale must be a one-element float32 tensor"
    if found_inf is not None and (found_inf.dtype != torch.float32 or found_inf.numel() != 1):
        return "found_inf must be a one-element float32 tensor"
    if n == 0:
        return ""
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _DTYPES:
        return "float32, float64, float16 or bfloat16 parameters only"
    for i, p in enumerate(params):
        contiguous = p.is_contiguous()
        if p.device != device or p.dtype != dtype or p.layout != torch.strided or not (
                contiguous or _non_overlapping_and_dense(p)):
            return f"every parameter must be a dense tensor of the first one's device and dtype (tensor {i})"
        for t in (grads[i], exp_avgs[i], exp_avg_sqs[i]):
            if (t.device != device or t.dtype != dtype or t.layout != torch.strided or t.numel() != p.numel()
                    or not (t.is_contiguous() if contiguous else t.stride() == p.stride())):
                return (f"tensor {i} of grads/exp_avgs/exp_avg_sqs differs from its parameter in device, dtype, "
                        "size or layout")
        if state_steps[i].numel() != 1:
            return f"every state step must have one element (tensor {i})"
    return ""


def fused_adam_readonly_grads_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay,
                               eps, maximize, decoupled, grad_scale, found_inf=None):
    why = refusal(params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale, found_inf)
    if why:
        raise RuntimeError(f"gradguard.fused_adam_readonly_grads_: {why}")
    # aten's op, not torch._fused_adam_(w)_: gradguard.fused_adam replaces those for the length of
    # a guarded step, and would hand this call back to the op.
    op = torch.ops.aten._fused_adamw_.default if decoupled else torch.ops.aten._fused_adam_.default
    op(params, [g.clone() for g in grads], exp_avgs, exp_avg_sqs, [], state_steps, lr=lr, beta1=beta1,
       beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize, grad_scale=grad_scale,
       found_inf=found_inf)

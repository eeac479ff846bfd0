"""Reference (default kernel) of gradguard::fused_adam_readonly_grads_: PyTorch's own fused Adam/AdamW
kernel stepped on a copy of the gradients, so that the division by grad_scale it writes back lands
in the copy. Bit-identical to what the op specifies by construction, on any device PyTorch's
kernel runs on; it costs the copy the compiled CPU kernel exists to avoid (gradguard.fused_adam
uses that kernel only)."""
from __future__ import annotations

import torch


def fused_adam_readonly_grads_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay,
                               eps, maximize, decoupled, grad_scale, found_inf=None):
    # aten's op, not torch._fused_adam_(w)_: gradguard.fused_adam replaces those for the length of
    # a guarded step, and would hand this call back to the op.
    op = torch.ops.aten._fused_adamw_.default if decoupled else torch.ops.aten._fused_adam_.default
    op(params, [g.clone() for g in grads], exp_avgs, exp_avg_sqs, [], state_steps, lr=lr, beta1=beta1,
       beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize, grad_scale=grad_scale,
       found_inf=found_inf)

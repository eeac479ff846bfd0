"""Training-hygiene checks of GradGuard: cheap host-side signals, each warned about once.

Whether the gradients were cleared between two steps is read from the gradient tensors
themselves, so it catches every way of clearing them (``opt.zero_grad()``, ``model.zero_grad()``,
``p.grad = None``, with or without ``set_to_none``) without patching anything:

- clearing with ``set_to_none`` makes backward create a new gradient tensor;
- clearing in place (``zero_()``) bumps the tensor's version counter once, and so does each
  backward that accumulates into it.

So if every gradient is the very tensor seen at the end of the last step and its version moved
by at most one (one backward, nothing else), nothing cleared it. (The first and the last of those
gradients must be among them too: gradguard/_host.py, whose compiled version holds only those two
weakly and compares the others by address.) Accumulating k micro-batches
after a clear moves it by k + 1 (in place) or yields new tensors (set_to_none): no warning.
Anything else that writes into the gradients between steps also makes the signal ambiguous,
and then no warning is given.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from gradguard._host import ClearMarks

# Frames in these packages are skipped when pointing a warning at the caller.
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


class HygieneWarning(UserWarning):
    """A training loop mistake GradGuard noticed (silence with ``hygiene=False`` or
    ``warnings.filterwarnings("ignore", category=gradguard.HygieneWarning)``)."""


NOT_CLEARED = (
    "gradguard: step() was called twice with no zero_grad() in between: the gradients of the "
    "previous step were never cleared, so this step used the sum of both steps' gradients. Call "
    "opt.zero_grad() (or model.zero_grad(), or set .grad to None) after each step; gradient "
    "accumulation over micro-batches is fine as long as you clear after each step."
)

EVAL_MODE = (
    "gradguard: step() was called while the model is in eval() mode (dropout off, batch-norm "
    "statistics frozen). Call model.train() before training steps."
)


def warn(message: str, category: type[Warning] = HygieneWarning) -> None:
    """Warns at the user's frame: step() is reached through torch's hook and no_grad wrappers
    (and an LR scheduler's), so a fixed stacklevel would point into torch."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class ClearTracker:
    """Remembers the gradient tensors and their versions at the end of each step
    (gradguard/_host.py: in C++ when the extension is loaded, ~10 ns per gradient)."""

    def __init__(self):
        self._marks = ClearMarks()

    def never_cleared(self, grads: list[torch.Tensor]) -> bool:
        return self._marks.unchanged(grads)

    def mark(self, grads: list) -> None:
        """``grads`` may hold None entries (parameters without a gradient): they are skipped."""
        self._marks.set(grads)

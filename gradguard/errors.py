"""Exceptions raised by gradguard."""
from __future__ import annotations


class NonFiniteGradError(RuntimeError):
    """Gradients held NaN or Inf where the caller asked to be told.

    ``names`` lists the offending parameters (names when they were given, else ``"param[i]"``);
    ``report`` is whatever detail the raiser had (a ``GradStats`` or a ``StepReport``).
    """

    def __init__(self, message: str, names=(), report=None):
        super().__init__(message)
        self.names = list(names)
        self.report = report

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


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (``None``, a string, a bool or a complex number where a real
    number is taken). A ``TypeError``, as torch and Python raise for these; also a ``ValueError``,
    which gradguard raised for them before, so that code catching either keeps working."""

"""gradguard: keep training numerically healthy at almost no cost.

Public API:
- ``grad_stats``, ``GradStats``, ``all_finite``, ``clip_grad_norm_``: one read pass over a list of
  gradients for per-tensor norms, NaN/Inf counts, the total norm and a found-inf flag;
  ``get_total_norm`` and ``clip_grads_with_norm_``: torch's split clip API, one pass each.
- ``safe_log``, ``safe_exp``, ``safe_sqrt``, ``safe_div``: clamped math in one fused pass, forward
  and backward, equal to the eager composites.
- ``backend()``: which kernels serve each device, and why the compiled extension is missing.
- ``GradGuard``: the optimizer wrapper (check, clip, skip, report); ``StepReport``, ``History``;
  spike policies ``ZScoreClip``, ``PercentileClip``; ``HygieneWarning``.
- ``NanTracer``, ``Origin``: where the first NaN/Inf of a step appeared.
- ``NonFiniteGradError``.

Environment: ``GRADGUARD_DISABLE_EXT=1`` forces the pure-PyTorch kernels;
``GRADGUARD_REQUIRE_EXT=1`` makes a missing or broken extension an ImportError. Both are switches:
``1/true/yes/on`` turn them on, ``0/false/no/off`` or empty/unset leave them off (any case), and
any other value is a ValueError at import naming the variable.
"""
from gradguard import _extension, _ops  # noqa: F401  (_ops defines the ops before _C registers kernels)
from gradguard import _safe_math_ops  # noqa: F401  (likewise for the safe math ops)

_extension.load()
_safe_math_ops.register_python_autograd()  # where the compiled module registered none

from gradguard._extension import backend  # noqa: E402
from gradguard.errors import ArgumentTypeError, NonFiniteGradError  # noqa: E402
from gradguard.safe_math import safe_div, safe_exp, safe_log, safe_sqrt  # noqa: E402
from gradguard.stats import GradStats, all_finite, clip_grad_norm_, grad_stats  # noqa: E402
from gradguard.stats import clip_grads_with_norm_, get_total_norm  # noqa: E402
from gradguard.hygiene import HygieneWarning  # noqa: E402
from gradguard.optim import GradGuard  # noqa: E402
from gradguard.report import History, StepReport  # noqa: E402
from gradguard.spike import PercentileClip, ZScoreClip  # noqa: E402
from gradguard.tracer import NanTracer, Origin  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "GradGuard",
    "GradStats",
    "History",
    "HygieneWarning",
    "NanTracer",
    "NonFiniteGradError",
    "Origin",
    "PercentileClip",
    "StepReport",
    "ZScoreClip",
    "all_finite",
    "backend",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
    "safe_div",
    "safe_exp",
    "safe_log",
    "safe_sqrt",
]

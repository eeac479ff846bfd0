"""A ready GradGuard step hook for TensorBoard (or any writer with ``add_scalar``/``add_text``/
``add_histogram``, e.g. Lightning's ``TensorBoardLogger.experiment``)::

    guard.add_step_hook(TensorBoardHook("runs/exp1", every=1, histogram_every=100))

On every ``every``-th guarded step it reads the report once (one ``as_dict()``: one transfer) and
writes ``grad/total_norm``, ``grad/clip_coef``, ``grad/skipped``, ``grad/clipped``, on a bad step
the non-finite layer names as text (``grad/nonfinite_layers``), and a histogram of the per-layer
gradient norms (``grad/layer_norms``, finite norms only) on the first logged step at or after each
multiple of ``histogram_every`` (with ``every=3, histogram_every=2``: steps 3, 6, 9, ...; with
``every=1``: every ``histogram_every``-th step). Steps
in between are not read at all, so with ``every > 1`` a bad step between two logged ones shows
only in ``grad/skipped_total``: a count kept on the device from every report, written (one more
8-byte read) on the logged steps.
"""
from __future__ import annotations

import math

import torch

from gradguard._numbers import check_int
from gradguard.integrations._common import require, skipped_total


def _writer(target):
    if isinstance(target, str):
        require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(target)
    if all(callable(getattr(target, m, None)) for m in ("add_scalar", "add_text", "add_histogram")):
        return target
    raise TypeError("gradguard.integrations.tensorboard.TensorBoardHook: `writer` must be a log directory (str) or "
                    f"a SummaryWriter-like object with add_scalar/add_text/add_histogram, got {type(target).__name__}")


class TensorBoardHook:
    """``fn(guard, report)`` for :meth:`gradguard.GradGuard.add_step_hook`. ``writer``: a log
    directory or a SummaryWriter; ``prefix``: the tag prefix; ``step_fn(report) -> int``: the
    global step to log at (default: the guard's step count)."""

    def __init__(self, writer, every: int = 1, histogram_every: int = 100, prefix: str = "grad/", step_fn=None):
        self.writer = _writer(writer)
        where = "gradguard.integrations.tensorboard.TensorBoardHook"
        self.every = check_int(every, f"{where}: `every`", 1)
        self.histogram_every = check_int(histogram_every, f"{where}: `histogram_every`", 1)
        if not isinstance(prefix, str):
            raise TypeError(f"gradguard.integrations.tensorboard.TensorBoardHook: `prefix` must be a str, "
                            f"got {type(prefix).__name__}")
        self.prefix = prefix
        if step_fn is not None and not callable(step_fn):  # else it failed at the first logged step
            raise TypeError(f"gradguard.integrations.tensorboard.TensorBoardHook: `step_fn` must be None or a "
                            f"callable report -> int, got {type(step_fn).__name__}")
        self.step_fn = step_fn

    def __call__(self, guard, report) -> None:
        if report.step % self.every:
            return
        step = report.step if self.step_fn is None else int(self.step_fn(report))
        # A multiple of histogram_every among the steps since the last logged one (stateless:
        # the same hook can serve another guard, or a resumed one).
        h = self.histogram_every
        histogram = report.step // h != (report.step - self.every) // h
        d = report.as_dict(layers=histogram)
        p, w = self.prefix, self.writer
        w.add_scalar(p + "total_norm", d["total_norm"], step)
        w.add_scalar(p + "clip_coef", d["clip_coef"], step)
        w.add_scalar(p + "skipped", float(d["skipped"]), step)
        w.add_scalar(p + "clipped", float(d["clipped"]), step)
        if self.every > 1:
            w.add_scalar(p + "skipped_total", float(skipped_total(guard)), step)  # restored on resume
        if d["nonfinite_layers"]:
            w.add_text(p + "nonfinite_layers", ", ".join(d["nonfinite_layers"]), step)
        if histogram:
            norms = [v["norm"] for v in d["layers"].values() if math.isfinite(v["norm"])]
            if norms:
                w.add_histogram(p + "layer_norms", torch.tensor(norms, dtype=torch.float64), step)

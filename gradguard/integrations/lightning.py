"""PyTorch Lightning: ``Trainer(callbacks=[GradGuardCallback(max_norm=1.0)])``.

How it hooks in: Lightning builds the optimizers from ``configure_optimizers`` in
``strategy.setup()``, then calls ``on_fit_start``, then restores a checkpoint's optimizer states.
In ``on_fit_start`` the callback replaces each of ``trainer.strategy.optimizers`` by a
``GradGuard`` around it (the strategy's setter rebuilds the ``LightningOptimizer`` wrappers), so
``configure_optimizers`` stays as it is, the schedulers keep their optimizer (the guard shares its
``param_groups``), and the checkpoint's optimizer state, guard state included, loads into the
guard on ``fit(ckpt_path=...)``.

Lightning runs the closure (forward, backward, ``on_before_optimizer_step``, its own clipping)
inside ``optimizer.step(closure)``; the guard's step evaluates the closure first and then checks
the gradients, so Lightning's clipping would run on the gradients before the guard sees them (a
NaN in one layer would reach all of them). The callback therefore owns the clipping:
``Trainer(gradient_clip_val=v)`` (clip by norm) becomes the guard's ``max_norm`` with a warning,
and Lightning's own clipping is turned off for the fit; ``gradient_clip_algorithm="value"`` or a
``gradient_clip_val`` different from the callback's ``max_norm`` is refused.

Under ``precision="16-mixed"`` the guard tells GradScaler it unscales itself
(``_step_supports_amp_scaling``): Lightning then skips its ``unscale_`` and ``scaler.step`` hands
the guard the loss scale and the scaler's flag.

Logged (through ``pl_module.log``, so every logger of the trainer gets them, every
``log_every_n_steps``): ``grad/total_norm``, ``grad/clip_coef``, ``grad/skipped`` (this step),
``grad/skipped_total`` (the guard's own count, restored on resume); for the second and later
optimizers of a fit, the same under ``grad/optimizer_<i>/``. These are device tensors: no host
sync until Lightning logs them. Bad
steps are found once per logged step by one read of the pending steps' flags; for each one every
logger gets ``grad/nonfinite/<parameter name> = 1`` at that step (TensorBoard also the names as
text), ``callback.bad_steps`` gets ``{"step", "guard_step", "layers", "skipped", "optimizer"}`` (``step``: the
step Lightning logs that batch's metrics at, its count of batches that stepped before it, which is
``trainer.global_step - 1`` with one optimizer but not when a batch steps several; ``guard_step``:
the guard's 1-based count) and a warning is
logged. A GradScaler overflow step (GradScaler's found-inf flag) is a bad step too, also listed
in ``callback.overflow_steps`` and logged as ``grad/amp_overflow = 1``, and its warning says so:
GradScaler lowers the scale, routinely while it calibrates, but its flag cannot tell an fp16
overflow from a NaN in the data (see ``_common.BadStepLog``). Without a logger (``logger=False``) the metrics go to
``callback_metrics`` only (``self.log(..., logger=False)``: Lightning warned at every call
otherwise); under ``barebones=True``, where ``self.log`` is off, they are not logged. Each guard
gets its own copy of a ``spike`` policy (two optimizers, or a second ``fit``, must not share one
set of statistics).
"""
from __future__ import annotations

import warnings

import torch

from gradguard.integrations._common import (BadStepLog, check_guard_kwargs, guard_kwargs_copy, log, require,
                                             skipped_total)
from gradguard.optim import GradGuard

pl = require("lightning.pytorch", "lightning", "lightning")
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402


class GradGuardCallback(pl.Callback):
    """Guards every optimizer of the fit with ``GradGuard(optimizer, model=pl_module,
    **guard_kwargs)``. ``callback.guard`` (the first) and ``callback.guards`` exist once fit
    starts."""

    def __init__(self, **guard_kwargs):
        super().__init__()
        self.guard_kwargs = check_guard_kwargs("gradguard.integrations.lightning.GradGuardCallback", guard_kwargs)
        self.guards: list[GradGuard] = []
        self._log = BadStepLog()
        self._new_reports = []  # (optimizer index, guard, report) of this batch's steps
        self._taken_clip = None

    @property
    def guard(self) -> GradGuard | None:
        return self.guards[0] if self.guards else None

    @property
    def bad_steps(self) -> list[dict]:
        return self._log.bad_steps

    @property
    def overflow_steps(self) -> list[dict]:
        """Those of ``bad_steps`` that were GradScaler overflows (skipped, the scale lowered)."""
        return self._log.overflow_steps

    def _take_over_clipping(self, trainer, kwargs: dict) -> dict:
        val = trainer.gradient_clip_val
        if not val:
            return kwargs
        algo = trainer.gradient_clip_algorithm or "norm"
        algo = getattr(algo, "value", algo)  # Lightning keeps a GradClipAlgorithmType: the user's string is its value
        where = "gradguard.integrations.lightning.GradGuardCallback"
        if str(algo) not in ("norm", "GradClipAlgorithmType.NORM"):
            raise ValueError(f"{where}: Trainer(gradient_clip_algorithm={str(algo)!r}) clips by value, which the "
                             "guard does not do; remove gradient_clip_val/gradient_clip_algorithm from the Trainer "
                             "and pass max_norm to the callback (it clips the total norm after checking the raw "
                             "gradients)")
        mine = kwargs.get("max_norm")
        if mine is not None and float(mine) != float(val):
            raise ValueError(f"{where}: Trainer(gradient_clip_val={val}) and GradGuardCallback(max_norm={mine}) "
                             "disagree; the callback owns clipping: remove gradient_clip_val from the Trainer")
        warnings.warn(f"{where} takes over Trainer(gradient_clip_val={val}): the guard clips the total norm to "
                      f"{val} after checking the raw gradients, and Lightning's own clipping is off for this fit",
                      UserWarning, stacklevel=2)
        self._taken_clip = (val, trainer.gradient_clip_algorithm)
        trainer.gradient_clip_val = None
        return {**kwargs, "max_norm": val}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning's tuner callbacks run their searches in their own on_fit_start, which Lightning
        # calls before every other callback's, and with trainer.callbacks replaced by their own:
        # the search's steps are neither guarded nor clipped by this callback (a NaN batch moved
        # the parameters and every later loss of the LR search was NaN, with no warning).
        if stage != "fit":
            return
        tuners = tuple(getattr(pl.callbacks, n) for n in ("LearningRateFinder", "BatchSizeFinder")
                       if hasattr(pl.callbacks, n))
        found = sorted({type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, tuners)})
        if found:
            clip = ("Lightning's own clipping (Trainer(gradient_clip_val=...), which the callback takes over "
                    "only once the search is over) clips them" if trainer.gradient_clip_val else
                    "set Trainer(gradient_clip_val=...) to clip them (the callback takes that over after the search)")
            warnings.warn(f"gradguard.integrations.lightning.GradGuardCallback: {' and '.join(found)} (Tuner) runs "
                          f"its training steps before the callback wraps the optimizers, with Lightning's tuner "
                          f"callbacks only: those steps are not checked for NaN/Inf, skipped or clipped by the "
                          f"guard; {clip}", UserWarning, stacklevel=2)

    def on_fit_start(self, trainer, pl_module) -> None:
        for opt in trainer.strategy.optimizers:  # refused before anything is taken over
            if isinstance(opt, GradGuard):
                raise ValueError("gradguard.integrations.lightning.GradGuardCallback: configure_optimizers already "
                                 "returns a GradGuard; use either the callback or your own GradGuard, not both")
        self._log.discard_unreported()  # a fit that raised left its unchecked steps: they are not this fit's
        kwargs = self._take_over_clipping(trainer, self.guard_kwargs)
        if is_overridden("configure_gradient_clipping", pl_module):
            warnings.warn("gradguard.integrations.lightning.GradGuardCallback: the module overrides "
                          "configure_gradient_clipping, which Lightning runs before the guard sees the gradients "
                          "(a NaN in one layer can then reach all of them); let the guard clip instead",
                          UserWarning, stacklevel=2)
        guards = []
        for opt in trainer.strategy.optimizers:
            guard = GradGuard(opt, model=pl_module, **guard_kwargs_copy(kwargs))
            # The ranks' agreement on an LBFGS closure's loss looks for DDP here: it wraps pl_module.
            guard._agree_with = trainer.strategy.model
            guard.add_step_hook(self._on_step)
            guards.append(guard)
        trainer.strategy.optimizers = guards
        self.guards = guards
        self._new_reports = []

    def _on_step(self, guard, report) -> None:
        # Every optimizer's steps (a GAN's discriminator skips too), every step of each (manual
        # optimization may step one twice in a batch): all are checked for NaN/Inf, and the
        # last of each guard in this batch is the one whose metrics are logged.
        index = next(i for i, g in enumerate(self.guards) if g is guard)
        self._new_reports.append((index, guard, report))

    def _batch_step(self, trainer) -> int:
        # Lightning logs a batch's metrics at its count of batches that stepped so far (not
        # trainer.global_step, which counts every optimizer's steps).
        return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step - 1)

    def _forget_unstepped(self, trainer, stepped) -> None:
        """Drops the per-step metrics of the guards that did not step in this batch (another
        optimizer's turn in manual optimization, a training_step that returned None) from
        Lightning's results: Lightning logs an on_step value again at every later logged batch
        until the epoch ends, as if it were new, so such a batch showed the guard's last norm and
        skip flag again (summed, one skip counted twice). Its results object is a dict keyed
        "<hook>.<name>" (Lightning 2.x); another layout is left alone. The values stay in
        trainer.callback_metrics, which keeps the latest of each; grad/skipped_total, a running
        count, is still logged."""
        results = getattr(trainer, "_results", None)
        if not isinstance(results, dict):
            return
        for index in range(len(self.guards)):
            if index not in stepped:
                prefix = "grad/" if index == 0 else f"grad/optimizer_{index}/"
                for name in ("total_norm", "clip_coef", "skipped"):
                    results.pop(f"on_train_batch_end.{prefix}{name}", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reports, self._new_reports = self._new_reports, []
        self._forget_unstepped(trainer, {index for index, _, _ in reports})
        if not reports:  # accumulating gradients: no optimizer step in this batch
            return
        step = self._batch_step(trainer)
        last = {}
        for index, guard, report in reports:
            self._log.add(step, report, index)
            last[index] = (guard, report)
        # barebones=True turns self.log off (and warns at every call); without a logger the
        # metrics still reach trainer.callback_metrics (a ModelCheckpoint or EarlyStopping may
        # monitor them), but logger=True would warn at every call that there is no logger.
        if not trainer.barebones:
            for index in sorted(last):
                guard, report = last[index]
                prefix = "grad/" if index == 0 else f"grad/optimizer_{index}/"
                pl_module.log_dict({prefix + "total_norm": report.total_norm.to(torch.float32),
                                    prefix + "clip_coef": report.clip_coef.to(torch.float32),
                                    prefix + "skipped": report.skipped.to(torch.float32),
                                    prefix + "skipped_total": skipped_total(guard)},
                                   on_step=True, on_epoch=False, logger=trainer.logger is not None, batch_size=1)
        # Lightning flushes the loggers when that count + 1 is a multiple of log_every_n_steps: so do we.
        if (step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            self._flush(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A fit that raised (on_nonfinite="raise", max_consecutive_skips) gets no teardown: the
        # steps that killed it are reported now, and Lightning's clipping given back.
        reports, self._new_reports = self._new_reports, []
        if reports:
            step = self._batch_step(trainer)
            for index, _, report in reports:
                self._log.add(step, report, index)
        try:
            self._flush(trainer)
        except Exception as e:  # noqa: BLE001  (the fit's own error is the one to raise)
            log.warning("gradguard: could not report the bad steps of a fit that raised: %r", e)
        finally:
            self._give_back_clipping(trainer)

    def _flush(self, trainer) -> None:
        bad_steps, overflows = self._log.flush()
        for bad in bad_steps:
            for logger in trainer.loggers:
                logger.log_metrics({f"grad/nonfinite/{name}": 1.0 for name in bad["layers"]}, step=bad["step"])
                add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
                if callable(add_text):
                    add_text("grad/nonfinite_layers", ", ".join(bad["layers"]), bad["step"])
        # GradScaler's overflow steps: a flag at the step, beside their layers' metrics.
        for over in overflows:
            for logger in trainer.loggers:
                logger.log_metrics({"grad/amp_overflow": 1.0}, step=over["step"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._give_back_clipping(trainer)

    def _give_back_clipping(self, trainer) -> None:
        if self._taken_clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._taken_clip
            self._taken_clip = None

"""Hugging Face ``Trainer`` (with Accelerate): ``Trainer(..., callbacks=[GradGuardCallback(max_norm=1.0)])``.

Why a callback alone is not enough, and what it does about it (transformers 5.x): at every
optimizer step ``Trainer`` calls ``accelerator.clip_grad_norm_(params, args.max_grad_norm)`` when
``max_grad_norm > 0``, and otherwise ``accelerator.clip_grad_norm_(params, inf)`` to log the norm;
both are ``torch.nn.utils.clip_grad_norm_``, which multiplies every gradient by NaN when one of
them holds a NaN or an Inf (clip coefficient ``max_norm / NaN``). That runs before
``on_pre_optimizer_step``, so a guard placed there would find all layers non-finite. So in
``on_train_begin`` the callback (it finds its ``Trainer`` on the call stack: the callback API
passes no trainer):

- wraps the optimizer inside the ``AcceleratedOptimizer`` in a ``GradGuard`` with the model's
  parameter names (re-pointing Accelerate's GradScaler step patch at the guard; under
  ``fp16=True`` ``scaler.step`` hands the guard the loss scale and the scaler's flag);
- takes over the clipping: ``args.max_grad_norm`` (HF's default is 1.0) becomes the guard's
  ``max_norm`` unless the callback was given one. ``args`` itself is left as it is (so
  ``training_args.bin``, written by checkpoints and ``save_model``, keeps it, also after a
  ``train()`` that raised);
- replaces ``trainer.accelerator.clip_grad_norm_`` (this trainer's Accelerator instance only) by a
  function that, for Trainer's own calls (``max_norm`` = ``args.max_grad_norm`` or ``inf``),
  leaves the gradients alone and returns a 0-dim tensor the guard fills with its total norm after
  the step, so Trainer's own ``grad_norm`` log is the guard's raw pre-clip norm (read by Trainer
  at its logging steps only); a call with another ``max_norm`` is refused.

Gradient accumulation needs nothing more: Trainer steps the optimizer once per accumulated step.
The guard's state rides in ``trainer_state.json`` (``stateful_callbacks["gradguard"]``, written
by a wrapper of this trainer's ``_save_checkpoint`` for the run, so every checkpoint has it,
``save_strategy="best"`` included) and is restored in ``on_train_begin`` when resuming; the
optimizer.pt of a checkpoint holds it too. A skipped step counts as skipped for Accelerate
(``accelerator.optimizer_step_was_skipped``), so Trainer does not step the LR schedule on it, as
for GradScaler's own skips, wherever the host knows the decision without a sync (everywhere but a
fused optimizer on a GPU, where the schedule advances, as it does with GradScaler and a fused
optimizer without the guard). Logged at Trainer's logging steps, merged into the
log Trainer writes there (``trainer.log`` of this trainer is wrapped for the run, so
``state.log_history`` and every ``report_to`` integration get them next to ``loss`` and ``grad_norm``): ``grad/total_norm``,
``grad/clip_coef``, ``grad/skipped``, ``grad/skipped_total`` and, for each bad step since the last
log, ``grad/nonfinite/<parameter name> = 1`` (also in ``callback.bad_steps``; those that were
GradScaler overflows also in ``callback.overflow_steps``, with ``grad/amp_overflow = 1``).

Everything taken over is given back at ``on_train_end``; when the guarded step raises
(``on_nonfinite="raise"``, ``max_consecutive_skips``), right there; after a ``train()`` that
raised elsewhere, at the callback's next ``on_train_begin``, or, when the callback was removed
from the Trainer meanwhile, at the next ``train()``'s first call of a patched method. A resumed
guard state that does not fit is refused before anything is taken over. Refused: DeepSpeed,
FSDP and XLA, whose clipping and optimizers are their own, and a Trainer whose optimizer is
already a ``GradGuard`` (use the callback or your own guard, not both).
"""
from __future__ import annotations

import math
import sys

import torch

from gradguard.integrations._common import (BadStepLog, log, check_guard_kwargs, guard_kwargs_copy, guard_state_json,
                                            load_guard_state_json, require, skipped_total)
from gradguard.optim import GradGuard

transformers = require("transformers", "transformers", "transformers")
require("accelerate", "accelerate", "transformers")
from accelerate.optimizer import patch_optimizer_step  # noqa: E402

STATE_KEY = "gradguard"
_WHERE = "gradguard.integrations.transformers.GradGuardCallback"


def _find_trainer():
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError(f"{_WHERE}: called outside transformers.Trainer.train(); pass it to "
                       "Trainer(callbacks=[...])")


class GradGuardCallback(transformers.TrainerCallback):
    """Guards the Trainer's optimizer with ``GradGuard(optimizer, model=model, **guard_kwargs)``;
    ``callback.guard`` exists once training starts."""

    def __init__(self, **guard_kwargs):
        self.guard_kwargs = check_guard_kwargs(_WHERE, guard_kwargs)
        self.guard: GradGuard | None = None
        self._log = BadStepLog()
        self._trainer = None
        self._accelerator_clip = None
        self._trainer_max_norm = None
        self._norm_outs: list[torch.Tensor] = []
        self._last_report = None
        self._pending_logs = None
        self._trainer_log = None
        self._wrapped = None  # (Accelerate's wrapper or the optimizer, the inner optimizer, its step patches)
        self._unlogged = None  # the last step's report, until a log carries it

    @property
    def bad_steps(self) -> list[dict]:
        return self._log.bad_steps

    @property
    def overflow_steps(self) -> list[dict]:
        """Those of ``bad_steps`` that were GradScaler overflows (skipped, the scale lowered)."""
        return self._log.overflow_steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = _find_trainer()
        # A train() that raised (on_nonfinite="raise", max_consecutive_skips) never reached
        # on_train_end: undo what that run's callback patched before patching again (wrapping
        # our own wrapper would recurse, and the stale one would overwrite the saved state).
        stale = getattr(trainer.__dict__.get("log"), "__self__", None)
        if isinstance(stale, GradGuardCallback):
            stale._undo()
        self._undo()  # this callback's own patches of another Trainer, left by a train() that raised
        accelerator = trainer.accelerator
        kind = str(accelerator.distributed_type).split(".")[-1]
        if kind in ("DEEPSPEED", "FSDP", "XLA"):
            raise NotImplementedError(f"{_WHERE}: {kind} clips and steps with its own machinery; the guard supports "
                                      "single-device and DDP training")
        acc_opt = trainer.optimizer
        inner = getattr(acc_opt, "optimizer", acc_opt)
        guard_kwargs = guard_kwargs_copy(self.guard_kwargs)
        if args.max_grad_norm and args.max_grad_norm > 0:
            if guard_kwargs.get("max_norm") is None:
                guard_kwargs["max_norm"] = float(args.max_grad_norm)
            elif float(guard_kwargs["max_norm"]) != float(args.max_grad_norm):
                log.info("gradguard: GradGuardCallback(max_norm=%s) clips; TrainingArguments.max_grad_norm=%s is "
                         "not used", guard_kwargs["max_norm"], args.max_grad_norm)
        if isinstance(inner, GradGuard):
            # Adopted as it is, a user's guard had neither this callback's step hook (no logs, the
            # LR schedule stepped on skips) nor Trainer's max_grad_norm, whose clipping the
            # callback takes over. (The callback's own guard is taken off at on_train_end.)
            raise ValueError(f"{_WHERE}: the Trainer's optimizer is already a GradGuard (create_optimizer or "
                             "optimizers=); use either the callback or your own GradGuard, not both: give the "
                             "Trainer the plain optimizer and the guard's settings to GradGuardCallback(...)")
        guard = self.guard
        if guard is None or guard.optimizer is not inner:
            # A second train() with this callback and the same optimizer keeps the guard (its
            # counters, spike statistics and history go on); a new optimizer gets a new guard.
            guard = GradGuard(inner, model=trainer.model, **guard_kwargs)
            guard.add_step_hook(self._on_step)
        saved = state.stateful_callbacks.get(STATE_KEY) if state.stateful_callbacks else None
        if saved is not None and state.global_step > 0:
            # Loaded before anything of the Trainer is touched: a checkpoint this guard refuses
            # (other history_size, spike policy, parameters) leaves the Trainer as it was, so that
            # it can be resumed again with a fitting callback, or trained without one. (Installed
            # first, the refused guard stayed inside the optimizer with nothing left to undo it.)
            device = next((p.device for p in trainer.model.parameters()), torch.device("cpu"))
            load_guard_state_json(guard, saved, device)
        self._trainer = trainer  # from here on, _undo() gives back whatever is taken over
        self._install(trainer, acc_opt, guard)
        self.guard = guard
        self._norm_outs = []
        # Trainer clips with args.max_grad_norm when it is > 0: that call (and its inf call when
        # it is 0) gets the guard's norm instead. args stays untouched, so that everything that
        # saves it (checkpoints, save_model, a save after a train() that raised) keeps the user's.
        self._trainer_max_norm = args.max_grad_norm
        self._accelerator_clip = accelerator.__dict__.get("clip_grad_norm_")
        accelerator.clip_grad_norm_ = self._clip_grad_norm
        if hasattr(trainer, "_mixed_mesh_grad_norm"):
            # Gradients on several meshes (expert parallelism) take Trainer's other path, which
            # clips with torch's clip_grads_with_norm_ itself: routed to the same placeholder.
            trainer._mixed_mesh_grad_norm = self._mixed_mesh_grad_norm
        self._trainer_log = trainer.log
        trainer.log = self._log_with_guard
        # The guard's state goes into trainer_state.json right before every checkpoint, whatever
        # decided to save: "steps"/"epoch", "best" (decided after the evaluation, when no callback
        # event is left before the save) or another callback setting should_save.
        self._trainer_save = trainer._save_checkpoint
        trainer._save_checkpoint = self._save_checkpoint_with_guard

    def _install(self, trainer, acc_opt, guard) -> None:
        """Puts the guard between the Trainer (or Accelerate's wrapper) and the optimizer; _undo
        takes it off again, so that a callback removed before the next train(), or replaced by
        one with other settings, leaves no guard of its own behind."""
        self._wrapped = (acc_opt, guard.optimizer, getattr(acc_opt, "_optimizer_original_step_method", None),
                         getattr(acc_opt, "_optimizer_patched_step_method", None))
        # A step that raises (on_nonfinite="raise", max_consecutive_skips) ends train() without
        # on_train_end: the guard's step, for this run, undoes everything there, so that the Trainer
        # is left without the guard whether or not this callback stays registered. (On the guard,
        # our own object: the LR scheduler has wrapped the Accelerate optimizer's step, and warns
        # when that wrapper is replaced.)
        guard.step = self._step_or_undo
        if acc_opt is guard.optimizer:
            trainer.optimizer = guard
        else:
            acc_opt.optimizer = guard
            if getattr(acc_opt, "scaler", None) is not None:
                # Accelerate patched the inner optimizer's bound step at prepare(): point it at the guard.
                acc_opt._optimizer_original_step_method = guard.step
                acc_opt._optimizer_patched_step_method = patch_optimizer_step(acc_opt, guard.step)
        trainer.callback_handler.optimizer = trainer.optimizer

    def _uninstall(self, trainer) -> None:
        if getattr(self, "_wrapped", None) is None:
            return
        acc_opt, inner, original_step, patched_step = self._wrapped
        self._wrapped = None
        # Ours, or Accelerate's patched step, which a step that raised inside scaler.step left there.
        self.guard.__dict__.pop("step", None)
        if trainer.optimizer is self.guard:
            trainer.optimizer = inner
        elif getattr(acc_opt, "optimizer", None) is self.guard:
            acc_opt.optimizer = inner
            if getattr(acc_opt, "scaler", None) is not None:
                acc_opt._optimizer_original_step_method = original_step
                acc_opt._optimizer_patched_step_method = patched_step
            if hasattr(acc_opt, "_is_overflow"):
                # Without a GradScaler only _on_step sets it: a skipped last step would otherwise
                # keep optimizer_step_was_skipped True, and hold the LR schedule, in every later
                # train() without the guard. (Accelerate starts it at False.)
                acc_opt._is_overflow = False
        trainer.callback_handler.optimizer = trainer.optimizer

    def _step_or_undo(self, *args, **kwargs):
        guard = self.guard
        try:
            return type(guard).step(guard, *args, **kwargs)
        except BaseException:
            trainer, report, self._last_report = self._trainer, self._last_report, None
            self._undo()
            if report is not None:
                # The step that ended the run (its hook ran before the guard raised): in
                # bad_steps, with its warning, as on_step_end would have put it.
                try:
                    self._log.add(trainer.state.global_step + 1, report)
                    self._log.flush()
                except Exception as e:  # noqa: BLE001  (the step's own error is the one to raise)
                    log.warning("gradguard: could not report the bad step of a train() that raised: %r", e)
            raise

    def _removed(self):
        """This callback's Trainer, when the callback is no longer among its callbacks while its
        patches are still in place (it was removed after a train() that raised somewhere other
        than in the guarded step: no on_train_end ran, and none of its events will run again):
        everything is undone first, so that the caller can go on with the Trainer's own method."""
        trainer = self._trainer
        if trainer is None or any(cb is self for cb in trainer.callback_handler.callbacks):
            return None
        self._undo()
        return trainer

    def _clip_grad_norm(self, parameters, max_norm, norm_type=2):
        trainer = self._removed()
        if trainer is not None:  # Trainer calls this before every optimizer step
            return trainer.accelerator.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        if (max_norm is not None and math.isfinite(max_norm) and max_norm > 0
                and max_norm != self._trainer_max_norm):
            raise RuntimeError(f"{_WHERE}: accelerator.clip_grad_norm_(max_norm={max_norm}) was called while the "
                               "guard owns clipping; pass max_norm to GradGuardCallback instead")
        # Trainer only wants the norm for its log: the guard's, once the step has run.
        device = next((p.device for p in parameters), torch.device("cpu"))
        # Every call of the step gets the norm (a user's callback may ask too, after Trainer).
        out = torch.full((), math.nan, dtype=torch.float32, device=device)
        self._norm_outs.append(out)
        return out

    def _mixed_mesh_grad_norm(self, model, max_norm):
        trainer = self._removed()
        if trainer is not None:
            return trainer._mixed_mesh_grad_norm(model, max_norm)
        return self._clip_grad_norm(list(model.parameters()), max_norm)

    def _save_checkpoint_with_guard(self, *args, **kwargs):
        trainer = self._removed()
        if trainer is not None:
            return trainer._save_checkpoint(*args, **kwargs)
        if self.guard is None or self._trainer is None:
            return self._trainer_save(*args, **kwargs)
        # The steps since the last log are checked before the checkpoint: a run resumed from it
        # (after a preemption) never logs them, and a bad step between the last log and the save
        # went unreported (no warning, not in bad_steps). Their metrics join the next log as usual.
        self._log.check_now()
        self._trainer.state.stateful_callbacks[STATE_KEY] = guard_state_json(self.guard)
        return self._trainer_save(*args, **kwargs)

    def _on_step(self, guard, report) -> None:
        # A skipped step is an optimizer step that did not happen: tell Accelerate, so that
        # Trainer holds the LR schedule as it does for GradScaler's own skips, wherever the host
        # knows the decision without a sync. (Accelerate's GradScaler path marks a step as taken
        # once the step method is called, and the guard's is always called.)
        acc_opt = self._trainer.optimizer if self._trainer is not None else None
        if acc_opt is not None and acc_opt is not guard and hasattr(acc_opt, "_is_overflow"):
            skipped = bool(report.skipped_if_known())
            acc_opt._is_overflow = skipped
            if getattr(acc_opt, "scaler", None) is not None:
                acc_opt._accelerate_step_called = not skipped
        for out in self._norm_outs:
            out.copy_(report.total_norm)  # across devices too: Trainer holds this very tensor
        self._norm_outs = []
        self._last_report = report

    def on_step_end(self, args, state, control, **kwargs):
        report, self._last_report = self._last_report, None
        if report is None:
            return
        self._log.add(state.global_step, report)
        self._unlogged = report
        if control.should_log:
            self._emit(report)

    def on_epoch_end(self, args, state, control, **kwargs):
        # logging_strategy="epoch": Trainer decides to log here (DefaultFlowCallback, which runs
        # before this callback), after the epoch's last on_step_end; the metrics then missed
        # every log.
        if control.should_log and self._unlogged is not None:
            self._emit(self._unlogged)

    def _emit(self, report) -> None:
        # One read for the four scalars; a second only when a pending step was bad.
        self._unlogged = None
        total, coef, skipped, skipped_all = torch.stack([
            report.total_norm.double(), report.clip_coef.double(), report.skipped.double(),
            # The guard's own count (restored on resume), made only on logging steps.
            skipped_total(self.guard).to(report.total_norm.device).double()]).tolist()
        logs = {"grad/total_norm": total, "grad/clip_coef": coef, "grad/skipped": skipped,
                "grad/skipped_total": skipped_all}
        bad_steps, overflows = self._log.flush()
        for bad in bad_steps:
            logs.update({f"grad/nonfinite/{name}": 1.0 for name in bad["layers"]})
        if overflows:  # GradScaler overflows since the last log: a flag beside their layers' metrics
            logs["grad/amp_overflow"] = 1.0
        self._pending_logs = {**(self._pending_logs or {}), **logs}

    def _log_with_guard(self, logs, *args, **kwargs):
        # Trainer.log: the guard's metrics join the log Trainer writes at this step, so they reach
        # state.log_history and every report_to integration with Trainer's own loss and grad_norm.
        trainer = self._removed()
        if trainer is not None:
            return trainer.log(logs, *args, **kwargs)
        if self._pending_logs:
            logs = {**logs, **self._pending_logs}
            self._pending_logs = None
        return self._trainer_log(logs, *args, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._log.flush()
        self._undo()

    def _undo(self) -> None:
        """Gives back what on_train_begin took over: the optimizer (the guard is taken off, and
        kept in ``self.guard`` for this callback's next train()), Accelerate's clipping, and this
        trainer's log and _save_checkpoint."""
        if self._trainer is not None:
            self._uninstall(self._trainer)
            clip = self._accelerator_clip
            if clip is None:
                self._trainer.accelerator.__dict__.pop("clip_grad_norm_", None)
            else:
                self._trainer.accelerator.clip_grad_norm_ = clip
            self._trainer.__dict__.pop("log", None)
            self._trainer.__dict__.pop("_save_checkpoint", None)
            self._trainer.__dict__.pop("_mixed_mesh_grad_norm", None)
            self._trainer = None

"""gradguard.integrations.transformers with the real Hugging Face Trainer and Accelerate (CPU,
a 2-layer GPT-2 built from a config: no download)."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradguard import GradGuard, NonFiniteGradError  # noqa: E402
from gradguard.integrations.transformers import STATE_KEY, GradGuardCallback  # noqa: E402
from integration_fixtures import (assert_identical, assert_state_identical, optimizer_state_snapshot,  # noqa: E402
                                  ref_clip_coef, ref_total_norm, snapshot)

pytestmark = pytest.mark.integrations

BAD = 2  # state.global_step while the bad step runs; Trainer logs it at BAD + 1
CULPRIT = "transformer.wpe.weight"


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class Plant(transformers.TrainerCallback):
    """Puts a NaN into wpe's gradient (in backward, through a tensor hook) during step `bad`, and
    records the float64 norm of the raw gradients, the parameters and the optimizer state there."""

    def __init__(self, model, bad):
        self.bad, self.step, self.ref_norms, self.before = bad, -1, {}, None
        self.model = model
        model.transformer.wpe.weight.register_hook(self._hook)

    def _hook(self, grad):
        if self.step == self.bad:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kw):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.ref_norms[state.global_step + 1] = ref_total_norm(grads)
        if state.global_step == self.bad:
            self.before = (snapshot(self.model), optimizer_state_snapshot(self.trainer.optimizer.optimizer.optimizer))

    def on_optimizer_step(self, args, state, control, **kw):
        if state.global_step == self.bad:
            params, opt_state = self.before
            assert_identical(params, self.model)
            assert_state_identical(opt_state, self.trainer.optimizer.optimizer.optimizer)
            self.before = "checked"


def run(tmp_path, max_steps, bad=BAD, resume=None, cb=None, scaler=None, **args_kw):
    trainer, cb, plant = make_trainer(tmp_path, max_steps, bad, cb, scaler, **args_kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb, plant


def make_trainer(tmp_path, max_steps, bad=BAD, cb=None, scaler=None, **args_kw):
    model = tiny_gpt2()
    plant = Plant(model, bad)
    cb = cb or GradGuardCallback(max_norm=1.0)
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1,
              report_to=[], use_cpu=True, save_strategy="steps", save_steps=4, disable_tqdm=True, learning_rate=1e-3,
              max_grad_norm=1.0)
    kw.update(args_kw)
    if kw["save_strategy"] != "steps":
        kw.pop("save_steps")
    args = transformers.TrainingArguments(**kw)
    evaluating = kw.get("eval_strategy", "no") != "no"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[plant, cb],
                                   eval_dataset=Tokens() if evaluating else None)
    plant.trainer = trainer
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    return trainer, cb, plant


def train_logs(trainer) -> dict[int, dict]:
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


def check_run(trainer, cb, plant, steps, first=1, rtol=1e-5):
    assert plant.before == "checked"
    assert cb.bad_steps == [{"step": BAD + 1, "guard_step": BAD + 1, "layers": [CULPRIT], "skipped": True, "optimizer": 0}]
    logs = train_logs(trainer)
    assert sorted(logs) == list(range(first, steps + 1))
    for step, e in logs.items():
        ref = plant.ref_norms[step]
        if step == BAD + 1:
            assert e["grad/skipped"] == 1.0 and math.isnan(e["grad/total_norm"]) and math.isnan(e["grad_norm"])
            assert e[f"grad/nonfinite/{CULPRIT}"] == 1.0
            assert [k for k in e if k.startswith("grad/nonfinite/")] == [f"grad/nonfinite/{CULPRIT}"]
        else:
            assert e["grad/skipped"] == 0.0 and not any(k.startswith("grad/nonfinite/") for k in e)
            # Trainer's own grad_norm is the guard's raw, pre-clip norm.
            assert e["grad/total_norm"] == pytest.approx(ref, rel=rtol)
            assert e["grad_norm"] == e["grad/total_norm"]
            assert e["grad/clip_coef"] == pytest.approx(ref_clip_coef(ref, 1.0), rel=rtol)
        assert e["grad/skipped_total"] == float(step > BAD)


def test_nan_in_wpe_is_named_alone_and_skipped(tmp_path):
    trainer, cb, plant = run(tmp_path, max_steps=5)
    # (Plant checked the inner optimizer through the guard during the run.) Given back after it:
    assert isinstance(cb.guard, GradGuard) and trainer.optimizer.optimizer is cb.guard.optimizer
    assert len(cb.guard.last.names) == len(list(trainer.model.parameters()))
    s = cb.guard.summary()
    assert (s["steps"], s["skipped"], s["nonfinite_steps"]) == (5, 1, 1)
    assert s["worst_layers"][0]["name"] == CULPRIT
    assert trainer.args.max_grad_norm == 1.0  # given back after the run
    check_run(trainer, cb, plant, 5)


def test_max_grad_norm_becomes_the_guards_max_norm(tmp_path):
    trainer, cb, plant = run(tmp_path, max_steps=4, cb=GradGuardCallback(), max_grad_norm=0.25)
    assert cb.guard.max_norm == 0.25
    for step, e in train_logs(trainer).items():
        if step != BAD + 1:
            assert e["grad/clip_coef"] == pytest.approx(ref_clip_coef(plant.ref_norms[step], 0.25), rel=1e-5)


def test_gradient_accumulation(tmp_path):
    trainer, cb, plant = run(tmp_path, max_steps=4, gradient_accumulation_steps=2)
    check_run(trainer, cb, plant, 4)


def test_bf16(tmp_path):
    trainer, cb, plant = run(tmp_path, max_steps=4, bf16=True)
    check_run(trainer, cb, plant, 4)


def test_fp16_grad_scaler(tmp_path, caplog):
    # Accelerate makes no GradScaler on the CPU (fp16=True then runs without loss scaling); the
    # scaler path is the GPU one, so the test hands Accelerate a CPU GradScaler before training:
    # accelerator.backward scales the loss, AcceleratedOptimizer.step runs scaler.step(guard).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    with caplog.at_level(logging.INFO, logger="gradguard.integrations"):
        trainer, cb, plant = run(tmp_path, max_steps=5, fp16=True, scaler=scaler)
    assert trainer.optimizer.scaler is scaler and cb.guard.last.amp
    # The NaN sets GradScaler's found-inf flag, which cannot tell it from an fp16 overflow: a bad
    # step, also one of GradScaler's overflow steps (skipped, the scale halved), whose warning says
    # so (filed as a routine overflow at INFO, a NaN in every batch went unreported).
    entry = {"step": BAD + 1, "guard_step": BAD + 1, "layers": [CULPRIT], "skipped": True, "optimizer": 0}
    assert cb.bad_steps == [entry] and cb.overflow_steps == [entry]
    records = [r for r in caplog.records if r.name == "gradguard.integrations"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, f"gradguard: step {BAD + 1}: GradScaler overflow, non-finite scaled gradients in {CULPRIT} "
                          "(skipped; GradScaler lowers the scale, routinely while it calibrates; a NaN or Inf in the "
                          "data looks the same, and then recurs)")]
    logs = train_logs(trainer)
    assert logs[BAD + 1]["grad/skipped"] == 1.0 and logs[BAD + 1]["grad/amp_overflow"] == 1.0
    assert logs[BAD + 1][f"grad/nonfinite/{CULPRIT}"] == 1.0
    assert [s for s, e in logs.items() if "grad/amp_overflow" in e] == [BAD + 1]
    # The scaler backs off once (the NaN step), from 256 to 128: the reference saw scaled grads.
    assert float(scaler.get_scale()) == 128.0
    for step in (1, 2):
        assert logs[step]["grad/total_norm"] == pytest.approx(plant.ref_norms[step] / 256.0, rel=1e-5)
    for step in (4, 5):
        assert logs[step]["grad/total_norm"] == pytest.approx(plant.ref_norms[step] / 128.0, rel=1e-5)


def test_fp16_on_the_cpu_without_scaler(tmp_path):
    trainer, cb, plant = run(tmp_path, max_steps=4, fp16=True)
    assert trainer.accelerator.scaler is None
    check_run(trainer, cb, plant, 4)


def test_resume_restores_the_guard(tmp_path):
    trainer, cb, _ = run(tmp_path, max_steps=4)
    saved = trainer.state.stateful_callbacks[STATE_KEY]
    assert saved["steps"] == 4
    first = cb.guard.summary()
    trainer2, cb2, plant2 = run(tmp_path, max_steps=6, bad=-1, resume=str(tmp_path / "out" / "checkpoint-4"))
    s = cb2.guard.summary()
    assert (s["steps"], s["skipped"], s["nonfinite_steps"]) == (6, 1, 1)
    assert s["worst_layers"][0]["name"] == CULPRIT and s["worst_layers"][0]["nonfinite_steps"] == 1
    assert cb2.guard.history.as_dict()["skipped"][:4] == [False, False, True, False]
    logs = train_logs(trainer2)
    # The guard's own count, restored: the skip before the checkpoint (it restarted from 0, while
    # summary() said 1).
    assert [e["grad/skipped_total"] for _, e in sorted(logs.items()) if _ > 4] == [1.0, 1.0]
    assert first["skipped"] == 1


class BadStepsAtSave(transformers.TrainerCallback):
    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_save(self, args, state, control, **kw):
        self.seen.append((state.global_step, [b["step"] for b in self.cb.bad_steps]))


def test_a_bad_step_between_the_last_log_and_a_checkpoint_is_reported_before_it(tmp_path):
    # logging_steps=5, a checkpoint at step 4, the bad step 3: it was checked only at the log of
    # step 5, which a run preempted after the checkpoint (and resumed from it) never reaches: no
    # warning, not in bad_steps. Checked before the checkpoint now; its metrics still join the
    # next log.
    cb = GradGuardCallback(max_norm=1.0)
    trainer, cb, plant = make_trainer(tmp_path, max_steps=5, cb=cb, logging_steps=5)
    at_save = BadStepsAtSave(cb)
    trainer.add_callback(at_save)
    trainer.train()
    assert at_save.seen[0] == (4, [BAD + 1]), at_save.seen
    assert [b["step"] for b in cb.bad_steps] == [BAD + 1]  # once
    assert train_logs(trainer)[5][f"grad/nonfinite/{CULPRIT}"] == 1.0


def test_save_strategy_best_checkpoints_carry_the_guard(tmp_path):
    # With "best" Trainer decides to save after the evaluation, when no callback event is left
    # before the save: the guard's state used to be written only when should_save was already set
    # at on_step_end, so these checkpoints had none and a resume restarted the guard.
    trainer, cb, _ = run(tmp_path, max_steps=4, save_strategy="best", eval_strategy="steps", eval_steps=2,
                         metric_for_best_model="loss")
    saved = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert saved
    for ckpt in saved:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["stateful_callbacks"][STATE_KEY]["steps"] == int(ckpt.name.split("-")[1])


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no_scaler", "grad_scaler"])
def test_a_skipped_step_does_not_step_the_lr_schedule(tmp_path, optim, scaled):
    # As for GradScaler's own skips: the guard's skip reaches optimizer_step_was_skipped. Before,
    # with a GradScaler, Accelerate counted every call of the guard's step as a step taken, and
    # without one nothing said skipped: the schedule advanced on the bad step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaled else None
    trainer, cb, plant = run(tmp_path, max_steps=5, optim=optim, lr_scheduler_type="linear", scaler=scaler,
                             **({"fp16": True} if scaled else {}))
    assert cb.guard.summary()["skipped"] == 1
    assert trainer.lr_scheduler.last_epoch == 4  # five optimizer steps, one skipped
    lrs = [e["learning_rate"] for _, e in sorted(train_logs(trainer).items())]
    assert lrs[BAD] == lrs[BAD + 1]  # logged after steps BAD + 1 and BAD + 2: the bad one held it


def test_a_train_that_raised_is_undone_by_the_next(tmp_path):
    # on_train_end does not run when train() raises: the next train() wrapped the callback's own
    # _save_checkpoint wrapper (a RecursionError at the first save) and read max_grad_norm = 0.
    cb = GradGuardCallback(on_nonfinite="raise")
    trainer, cb, plant = make_trainer(tmp_path, 4, cb=cb)
    with pytest.raises(NonFiniteGradError):
        trainer.train()
    assert trainer.args.max_grad_norm == 1.0  # never taken: a save now still writes the user's
    plant.bad = -1
    trainer.train()  # saves checkpoint-4
    assert cb.guard.max_norm == 1.0 and trainer.args.max_grad_norm == 1.0
    assert "log" not in trainer.__dict__ and "_save_checkpoint" not in trainer.__dict__
    assert (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").exists()


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="max_norm"):
        GradGuardCallback(max_norm=-1.0)
    with pytest.raises(TypeError, match="'optimizer'"):
        GradGuardCallback(optimizer=None)


def test_a_trainer_whose_optimizer_is_already_a_guard_is_refused(tmp_path):
    # Adopted as it was, the guard got neither the callback's hook (no grad/* logs, the LR schedule
    # stepped on the skip) nor max_grad_norm, which the callback still set to 0: nothing clipped.
    model = tiny_gpt2()
    guard = GradGuard(torch.optim.AdamW(model.parameters(), lr=1e-3))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(guard, None),
                                   callbacks=[GradGuardCallback()])
    with pytest.raises(ValueError, match="already a GradGuard"):
        trainer.train()


def test_checkpoints_keep_the_users_max_grad_norm(tmp_path):
    # The callback once ran with max_grad_norm = 0 (it owns clipping); checkpoints saved it so, and
    # a run resumed from their training_args.bin never clipped.
    trainer, cb, _ = run(tmp_path, max_steps=4, bad=-1, cb=GradGuardCallback(), max_grad_norm=0.7)
    saved = torch.load(tmp_path / "out" / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert saved.max_grad_norm == 0.7 and trainer.args.max_grad_norm == 0.7


class SaveModelAt(transformers.TrainerCallback):
    """Calls trainer.save_model() in the middle of the run, as a user's callback may."""

    def __init__(self, at, out):
        self.at, self.out, self.trainer = at, out, None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            self.trainer.save_model(str(self.out))


def test_save_model_during_the_run_keeps_the_users_max_grad_norm(tmp_path):
    # save_model() writes training_args.bin too; called mid-run it wrote max_grad_norm = 0 (the
    # checkpoint wrapper alone put the user's value back).
    trainer, cb, _ = make_trainer(tmp_path, 3, bad=-1, cb=GradGuardCallback(), max_grad_norm=0.7, save_strategy="no")
    saver = SaveModelAt(2, tmp_path / "mid")
    saver.trainer = trainer
    trainer.add_callback(saver)
    trainer.train()
    saved = torch.load(tmp_path / "mid" / "training_args.bin", weights_only=False)
    assert saved.max_grad_norm == 0.7
    assert cb.guard.max_norm == 0.7


class ClipCall(transformers.TrainerCallback):
    def __init__(self, max_norm):
        self.max_norm, self.trainer, self.got = max_norm, None, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.got = self.trainer.accelerator.clip_grad_norm_(self.trainer.model.parameters(), self.max_norm)


def test_trainers_own_clip_calls_get_the_guards_norm_and_others_are_refused(tmp_path):
    # args.max_grad_norm is left as it is, so Trainer calls accelerator.clip_grad_norm_ with it:
    # that call (and one with inf) must not clip (the guard does); another max_norm is refused.
    trainer, cb, plant = make_trainer(tmp_path, 2, bad=-1, cb=GradGuardCallback(), max_grad_norm=0.7, save_strategy="no")
    call = ClipCall(0.7)
    call.trainer = trainer
    trainer.add_callback(call)
    trainer.train()
    assert call.got.dtype == torch.float32 and call.got.item() == pytest.approx(plant.ref_norms[2], rel=1e-5)
    assert train_logs(trainer)[2]["grad_norm"] == call.got.item()  # Trainer's own call was filled too
    assert train_logs(trainer)[2]["grad/clip_coef"] == pytest.approx(ref_clip_coef(plant.ref_norms[2], 0.7), rel=1e-5)
    trainer, cb, plant = make_trainer(tmp_path, 2, bad=-1, cb=GradGuardCallback(), max_grad_norm=0.7, save_strategy="no")
    call = ClipCall(0.5)
    call.trainer = trainer
    trainer.add_callback(call)
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_\(max_norm=0.5\) was called while the guard owns clipping"):
        trainer.train()


def test_a_guard_around_accelerates_optimizer_is_refused():
    # GradGuard(accelerator.prepare(opt)): the guard checked and clipped the half-accumulated
    # gradients of every micro-step (and under fp16 the still-scaled ones); wrap before prepare.
    import accelerate

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 1)
    prepared = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"AcceleratedOptimizer; wrap the plain optimizer before accelerator.prepare"):
        GradGuard(prepared)
    guard = accelerator.prepare(GradGuard(torch.optim.SGD(model.parameters(), lr=0.1)))
    assert guard.optimizer.__class__.__name__ == "GradGuard"


class _MixedMesh(torch.nn.Module):
    """One parameter a DTensor, the rest plain (expert parallelism's layout): Trainer takes its
    mixed-mesh path, which clips with torch's clip_grads_with_norm_ itself."""

    def __init__(self, mesh):
        from torch.distributed.tensor import Replicate, distribute_tensor

        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        self.a.weight = torch.nn.Parameter(distribute_tensor(self.a.weight.detach(), mesh, [Replicate()]))

    def forward(self, x, labels=None):
        h = torch.nn.functional.linear(x, self.a.weight.to_local(), self.a.bias)
        return {"loss": ((self.b(h) - labels) ** 2).mean()}


class _Big(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g) * 100, "labels": torch.randn(1, generator=g) * 100}


def _mixed_mesh_run(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen[state.global_step] = ref_total_norm([p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                                                      for p in model.parameters()])

    torch.manual_seed(0)
    model = _MixedMesh(init_device_mesh("cpu", (1,)))
    model._ddp_params_and_buffers_to_ignore = ["a.weight"]
    cb = GradGuardCallback(max_norm=1e6)  # a loose clip; args keeps HF's max_grad_norm=1.0
    args = transformers.TrainingArguments(output_dir=out_dir, max_steps=2, per_device_train_batch_size=8, report_to=[],
                                          use_cpu=True, disable_tqdm=True, save_strategy="no", learning_rate=0.0,
                                          remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Big(), callbacks=[cb, Probe()])
    trainer.train()
    return {"mixed": bool(trainer._mixed_mesh_grads), "seen": seen, "guard": float(cb.guard.last.total_norm),
            "patched_left": "_mixed_mesh_grad_norm" in trainer.__dict__}


def test_mixed_mesh_gradients_reach_the_guard_unclipped(tmp_path):
    # Trainer's mixed-mesh path clipped with torch's clip_grads_with_norm_ (at max_grad_norm, not
    # the callback's max_norm) before the guard saw the gradients.
    import dist_spawn

    if not hasattr(transformers.Trainer, "_mixed_mesh_grad_norm"):
        pytest.skip("this transformers has no mixed-mesh clipping path")
    (r,) = dist_spawn.run(_mixed_mesh_run, world_size=1, args=(str(tmp_path / "out"),), timeout=180)
    assert r["mixed"] and not r["patched_left"]
    assert min(r["seen"].values()) > 100.0  # raw norms: Trainer clipped nothing
    assert r["guard"] == pytest.approx(r["seen"][1], rel=1e-5)


class _InnerSeen(transformers.TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.seen.append(optimizer.optimizer)


def test_a_callback_swapped_or_removed_between_trains_leaves_no_guard_behind(tmp_path):
    # A second train() with a new callback adopted the first one's guard (its max_norm, no step
    # hook: NaN grad_norm in every log, no grad/* metrics, the LR schedule stepped on skips), and a
    # removed callback's guard stayed, behind Trainer's own restored clip.
    cb1 = GradGuardCallback(max_norm=1.0)
    trainer, cb1, plant = make_trainer(tmp_path, 3, bad=-1, cb=cb1, save_strategy="no")
    trainer.train()
    trainer.remove_callback(cb1)
    cb2 = GradGuardCallback(max_norm=0.1)
    seen = _InnerSeen()
    trainer.add_callback(cb2)
    trainer.add_callback(seen)
    plant.bad = 1  # a new run: steps 1-3 again
    trainer.train()
    assert cb2.guard is not cb1.guard and cb2.guard.max_norm == 0.1
    assert all(o is cb2.guard for o in seen.seen) and len(seen.seen) == 3
    assert cb2.bad_steps == [{"step": 2, "guard_step": 2, "layers": [CULPRIT], "skipped": True, "optimizer": 0}]
    assert trainer.lr_scheduler.last_epoch == 2  # held on the skipped step
    logs = train_logs(trainer)
    assert [logs[s]["grad/skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert logs[3]["grad/clip_coef"] * logs[3]["grad/total_norm"] == pytest.approx(0.1, rel=1e-5)
    assert math.isfinite(logs[3]["grad_norm"]) and logs[3]["grad_norm"] == logs[3]["grad/total_norm"]
    trainer.remove_callback(cb2)
    seen.seen.clear()
    plant.bad = -1
    trainer.args.max_steps = 1
    trainer.train()
    assert len(seen.seen) == 1 and not isinstance(seen.seen[0], GradGuard)


def test_logging_strategy_epoch_carries_the_guards_metrics(tmp_path):
    # Trainer decides an epoch's log in on_epoch_end, after the last on_step_end: the guard's
    # metrics missed every log.
    steps_per_epoch = len(Tokens()) // 4
    trainer, cb, plant = run(tmp_path, 2 * steps_per_epoch, logging_strategy="epoch", save_strategy="no")
    logs = train_logs(trainer)
    assert sorted(logs) == [steps_per_epoch, 2 * steps_per_epoch]
    for step, e in logs.items():
        assert e["grad/total_norm"] == e["grad_norm"] and e["grad/skipped"] == 0.0
        assert e["grad/skipped_total"] == 1.0
    assert logs[steps_per_epoch][f"grad/nonfinite/{CULPRIT}"] == 1.0
    assert f"grad/nonfinite/{CULPRIT}" not in logs[2 * steps_per_epoch]


def _guard_left(trainer) -> list[str]:
    """What of a GradGuardCallback is still in the Trainer."""
    left = [k for k in ("log", "_save_checkpoint", "_mixed_mesh_grad_norm") if k in trainer.__dict__]
    left += ["accelerator.clip_grad_norm_"] if "clip_grad_norm_" in trainer.accelerator.__dict__ else []
    if isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), GradGuard):
        left.append("optimizer")
    return left


@pytest.mark.parametrize("then", ["fixed", "dropped", "fixed_noresume", "dropped_noresume"])
def test_a_refused_resume_leaves_the_trainer_as_it_was(tmp_path, then):
    # The refused guard was installed before its state was loaded, and nothing undid it: resuming
    # again failed the same way (Trainer loaded optimizer.pt into it), a fitting callback without
    # resuming was refused ("already a GradGuard"), and no callback ran through the stale guard.
    run(tmp_path, max_steps=4, bad=-1, cb=GradGuardCallback(history_size=100))
    ckpt = str(tmp_path / "out" / "checkpoint-4")
    wrong = GradGuardCallback(history_size=50)
    trainer, _, plant = make_trainer(tmp_path, 6, bad=-1, cb=wrong, save_strategy="no")
    with pytest.raises(ValueError, match="history holds 100 steps but this GradGuard was built with history_size=50"):
        trainer.train(resume_from_checkpoint=ckpt)
    assert _guard_left(trainer) == [] and wrong.guard is None
    trainer.remove_callback(wrong)
    seen = _InnerSeen()
    trainer.add_callback(seen)
    cb = GradGuardCallback(history_size=100) if then.startswith("fixed") else None
    if cb is not None:
        trainer.add_callback(cb)
    resume = None if then.endswith("noresume") else ckpt
    trainer.train(resume_from_checkpoint=resume)
    steps = 6 if resume is None else 2
    assert len(seen.seen) == steps
    assert all(isinstance(o, GradGuard) == (cb is not None) for o in seen.seen)
    if cb is not None:
        assert cb.guard.summary()["steps"] == 6  # 4 restored + 2, or 6 from scratch
    assert _guard_left(trainer) == []


class _RaiseAt(transformers.TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise RuntimeError("stopped by a user callback")


@pytest.mark.parametrize("how", ["on_nonfinite_raise", "max_consecutive_skips", "elsewhere"])
def test_a_callback_removed_after_a_train_that_raised_leaves_no_guard_behind(tmp_path, how):
    # train() raised (the guard's step, or anything else: no on_train_end), the user removed the
    # callback and trained again: the guard was still inside Accelerate's optimizer and this
    # trainer's clip_grad_norm_, log and _save_checkpoint still the callback's, so the second
    # train() ran through the guard (and raised NonFiniteGradError again).
    kw = {"on_nonfinite_raise": {"on_nonfinite": "raise"}, "max_consecutive_skips": {"max_consecutive_skips": 1},
          "elsewhere": {}}[how]
    cb = GradGuardCallback(**kw)
    trainer, cb, plant = make_trainer(tmp_path, 4, cb=cb, save_strategy="no", lr_scheduler_type="linear")
    raiser = _RaiseAt(1)
    if how == "elsewhere":
        trainer.add_callback(raiser)
    with pytest.raises(RuntimeError if how == "elsewhere" else NonFiniteGradError):
        trainer.train()
    if how != "elsewhere":
        # Undone as the guard's step raised; the step that ended the run is reported.
        assert _guard_left(trainer) == [] and "step" not in cb.guard.__dict__
        assert cb.bad_steps == [{"step": BAD + 1, "guard_step": BAD + 1, "layers": [CULPRIT], "skipped": True,
                                 "optimizer": 0}]
    else:
        trainer.remove_callback(raiser)
    trainer.remove_callback(cb)
    seen = _InnerSeen()
    trainer.add_callback(seen)
    plant.bad = -1
    trainer.train()  # no guard: nothing raises, nothing skips
    assert len(seen.seen) == 4 and not any(isinstance(o, GradGuard) for o in seen.seen)
    assert _guard_left(trainer) == []
    # The guard's last skip no longer reads as Accelerate's optimizer_step_was_skipped: the LR
    # schedule steps on every step of the run without the guard.
    assert trainer.lr_scheduler.last_epoch == 4
    assert "grad/total_norm" not in trainer.state.log_history[-2]

"""gradguard.integrations.lightning with the real Lightning Trainer (CPU, tiny model)."""
from __future__ import annotations

import csv
import logging
import math
import os

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import gradguard  # noqa: E402
from gradguard import GradGuard  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402
from integration_fixtures import (assert_identical, assert_state_identical, optimizer_state_snapshot,  # noqa: E402
                                  plant_nan, ref_clip_coef, ref_total_norm, regression_data, snapshot)

pytestmark = pytest.mark.integrations

BAD = 3  # trainer.global_step while the bad step runs: the step Lightning logs it at


class Tiny(pl.LightningModule):
    def __init__(self, bad_step=BAD, lr=1e-2, fused=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.bad_step, self.lr, self.fused = bad_step, lr, fused
        self.ref_norms = {}  # global_step (as logged) -> float64 norm of the raw grads
        self.before_bad = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == self.bad_step:
            plant_nan(self.net[2].weight.grad)
            self.before_bad = (snapshot(self), optimizer_state_snapshot(optimizer.optimizer))
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        scale = 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale = float(scaler.get_scale())
        self.ref_norms[self.trainer.global_step] = ref_total_norm(grads) / scale

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == self.bad_step + 1 and self.before_bad is not None:
            params, state = self.before_bad
            assert_identical(params, self)
            assert_state_identical(state, self.trainer.strategy.optimizers[0].optimizer)
            self.before_bad = "checked"

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused or None)


def _trainer(tmp_path, callback, max_steps, name="run", **kw):
    kw.setdefault("accelerator", "cpu")
    return pl.Trainer(max_steps=max_steps, callbacks=[callback], logger=CSVLogger(str(tmp_path), name=name),
                      log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, **kw)


def _loader():
    return torch.utils.data.DataLoader(regression_data(), batch_size=8)


def _csv_metrics(trainer) -> dict[int, dict[str, float]]:
    rows = {}
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def _check_run(trainer, cb, model, steps, max_norm=1.0, rtol=1e-5, overflow=False):
    # overflow: under a GradScaler, whose flag the NaN sets: the bad step is also one of
    # GradScaler's overflow steps, logged with grad/amp_overflow too.
    assert model.before_bad == "checked"
    entry = {"step": BAD, "guard_step": BAD + 1, "layers": ["net.2.weight"], "skipped": True, "optimizer": 0}
    assert (cb.bad_steps, cb.overflow_steps) == ([entry], [entry] if overflow else [])
    rows = _csv_metrics(trainer)
    assert sorted(rows) == list(range(steps))
    for step in range(steps):
        row = rows[step]
        ref = model.ref_norms[step]
        if step == BAD:
            assert row["grad/skipped"] == 1.0 and math.isnan(row["grad/total_norm"])
            assert row["grad/clip_coef"] == 1.0
            assert row["grad/nonfinite/net.2.weight"] == 1.0
            assert row.get("grad/amp_overflow") == (1.0 if overflow else None)
        else:
            assert row["grad/skipped"] == 0.0
            assert "grad/nonfinite/net.2.weight" not in row and "grad/amp_overflow" not in row
            assert row["grad/total_norm"] == pytest.approx(ref, rel=rtol)
            assert row["grad/clip_coef"] == pytest.approx(ref_clip_coef(ref, max_norm), rel=rtol)
        assert row["grad/skipped_total"] == float(step >= BAD)
    named = [k for k in rows[BAD] if k.startswith("grad/nonfinite/")]
    assert named == ["grad/nonfinite/net.2.weight"]


def test_nan_step_skipped_named_logged_and_params_untouched(tmp_path):
    model, cb = Tiny(), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=6)
    trainer.fit(model, _loader())
    assert isinstance(cb.guard, GradGuard) and trainer.strategy.optimizers[0] is cb.guard
    assert cb.guard.last.names == [n for n, _ in model.named_parameters()]
    s = cb.guard.summary()
    assert (s["steps"], s["skipped"], s["nonfinite_steps"]) == (6, 1, 1)
    assert s["worst_layers"][0]["name"] == "net.2.weight" and s["worst_layers"][0]["nonfinite_steps"] == 1
    _check_run(trainer, cb, model, 6)


def test_takes_over_gradient_clip_val(tmp_path):
    # Lightning's clipping would see the raw gradients first and spread the NaN to every layer.
    model, cb = Tiny(), GradGuardCallback()
    trainer = _trainer(tmp_path, cb, max_steps=5, gradient_clip_val=0.5)
    with pytest.warns(UserWarning, match=r"takes over Trainer\(gradient_clip_val=0.5\)"):
        trainer.fit(model, _loader())
    assert cb.guard.max_norm == 0.5
    assert trainer.gradient_clip_val == 0.5  # given back after the fit
    _check_run(trainer, cb, model, 5, max_norm=0.5)


@pytest.mark.parametrize("trainer_kw, match", [
    ({"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"}, r"gradient_clip_algorithm='value'\) clips by value"),
    ({"gradient_clip_val": 2.0}, "disagree"),
])
def test_refuses_conflicting_clipping(tmp_path, trainer_kw, match):
    trainer = _trainer(tmp_path, GradGuardCallback(max_norm=1.0), max_steps=2, **trainer_kw)
    with pytest.raises(ValueError, match=match):
        trainer.fit(Tiny(), _loader())


def test_refuses_guard_from_configure_optimizers(tmp_path):
    class Guarded(Tiny):
        def configure_optimizers(self):
            return GradGuard(torch.optim.SGD(self.parameters(), lr=0.1))

    with pytest.raises(ValueError, match="already returns a GradGuard"):
        _trainer(tmp_path, GradGuardCallback(), max_steps=2).fit(Guarded(), _loader())


def test_a_refused_fit_leaves_lightnings_clipping_as_it_was(tmp_path):
    class Guarded(Tiny):
        def configure_optimizers(self):
            return GradGuard(torch.optim.SGD(self.parameters(), lr=0.1))

    trainer = _trainer(tmp_path, GradGuardCallback(), max_steps=2, gradient_clip_val=0.5)
    with pytest.raises(ValueError, match="already returns a GradGuard"):
        trainer.fit(Guarded(), _loader())
    assert trainer.gradient_clip_val == 0.5  # refused before the take-over (it was left at None)


@pytest.mark.parametrize("guard_kw", [{"on_nonfinite": "raise"}, {"max_consecutive_skips": 1}])
def test_a_fit_that_raised_reports_its_bad_step_and_gives_clipping_back(tmp_path, guard_kw):
    # Lightning calls no teardown when fit raises: gradient_clip_val stayed None (the next fit on
    # the trainer clipped nothing), and the steps that killed the run were never reported, then
    # showed up in the next fit's log.
    cb = GradGuardCallback(**guard_kw)
    trainer = _trainer(tmp_path, cb, max_steps=6, gradient_clip_val=0.5)
    with pytest.warns(UserWarning, match="takes over"), pytest.raises(gradguard.NonFiniteGradError):
        trainer.fit(Tiny(), _loader())
    assert trainer.gradient_clip_val == 0.5
    assert [(b["step"], b["layers"]) for b in cb.bad_steps] == [(BAD, ["net.2.weight"])]
    assert [s for s, r in sorted(_csv_metrics(trainer).items()) if "grad/nonfinite/net.2.weight" in r] == [BAD]
    second = _trainer(tmp_path, cb, max_steps=2, name="second", gradient_clip_val=0.5)
    with pytest.warns(UserWarning, match="takes over"):
        second.fit(Tiny(bad_step=-1), _loader())
    assert cb.guard.max_norm == 0.5 and len(cb.bad_steps) == 1  # nothing carried into the second fit


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradGuardCallback(on_nonfinite="explode")
    with pytest.raises(TypeError, match="'model'"):
        GradGuardCallback(model=torch.nn.Linear(1, 1))


def test_resume_restores_the_guard(tmp_path):
    model, cb = Tiny(), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=5)
    trainer.fit(model, _loader())
    ckpt = str(tmp_path / "five.ckpt")
    trainer.save_checkpoint(ckpt)
    first = cb.guard.summary()
    history = cb.guard.history.as_dict()

    model2, cb2 = Tiny(bad_step=-1), GradGuardCallback(max_norm=1.0)
    trainer2 = _trainer(tmp_path, cb2, max_steps=8, name="resumed")
    trainer2.fit(model2, _loader(), ckpt_path=ckpt)
    s = cb2.guard.summary()
    assert (s["steps"], s["skipped"], s["nonfinite_steps"]) == (8, 1, 1)
    assert s["clipped"] >= first["clipped"]
    assert s["worst_layers"][0] == {**first["worst_layers"][0], "max_norm": s["worst_layers"][0]["max_norm"]}
    resumed = cb2.guard.history.as_dict()
    assert resumed["step"] == list(range(1, 9))
    assert resumed["skipped"][:5] == history["skipped"]
    rows = _csv_metrics(trainer2)
    assert sorted(rows) == [5, 6, 7] and all(rows[k]["grad/skipped"] == 0.0 for k in rows)
    # The guard's own count, restored: the skip before the checkpoint (it restarted from 0).
    assert all(rows[k]["grad/skipped_total"] == 1.0 for k in rows)


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization, two optimizers; batch 1 has a NaN label that only the second
    optimizer's loss sees (a GAN's discriminator going bad)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def training_step(self, batch, i):
        x, y = batch
        if i == 1:
            y = y.clone()
            y[0, 0] = math.nan
        oa, ob = self.optimizers()
        oa.zero_grad()
        self.manual_backward(self.b(self.a(x)).pow(2).mean())
        oa.step()
        ob.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.b(self.a(x).detach()), y))
        ob.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.1)]


def test_every_optimizers_bad_steps_are_reported(tmp_path):
    """Only the first optimizer's reports were kept: the second's skip was in its summary() but not
    in bad_steps, the warning or the logs."""
    model, cb = _TwoOptimizers(), GradGuardCallback(max_norm=1.0)
    data = torch.utils.data.DataLoader([(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)], batch_size=None)
    trainer = _trainer(tmp_path, cb, max_steps=6)
    trainer.fit(model, data)
    assert [g.summary()["skipped"] for g in cb.guards] == [0, 1]
    assert [(b["optimizer"], b["layers"], b["skipped"]) for b in cb.bad_steps] == [(1, ["b.weight", "b.bias"], True)]
    rows = _csv_metrics(trainer)

    def last(key):
        return [r[key] for _, r in sorted(rows.items()) if key in r][-1]

    assert last("grad/skipped_total") == 0.0 and last("grad/optimizer_1/skipped_total") == 1.0
    # Logged where Lightning logs that batch (batch 1), not at trainer.global_step - 1 (3: it
    # counts both optimizers' steps).
    assert cb.bad_steps[0]["step"] == 1
    assert [s for s, r in sorted(rows.items()) if "grad/nonfinite/b.weight" in r] == [1]
    assert rows[1]["grad/optimizer_1/skipped"] == 1.0


class _TwoStepsPerBatch(pl.LightningModule):
    """Manual optimization stepping one optimizer twice per batch (a WGAN critic); the first
    step of batch 1 sees a NaN."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Linear(8, 1)

    def training_step(self, batch, i):
        x, y = batch
        opt = self.optimizers()
        for k in range(2):
            opt.zero_grad()
            target = y.clone()
            if i == 1 and k == 0:
                target[0, 0] = math.nan
            self.manual_backward(torch.nn.functional.mse_loss(self.net(x), target))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_every_step_of_a_batch_is_checked(tmp_path):
    # Only the last report of each optimizer per batch was kept: the first step's skip was in
    # summary() but not in bad_steps, the warning or the logs.
    model, cb = _TwoStepsPerBatch(), GradGuardCallback(max_norm=1.0)
    data = torch.utils.data.DataLoader([(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)], batch_size=None)
    trainer = _trainer(tmp_path, cb, max_steps=6)
    trainer.fit(model, data)
    assert cb.guard.summary()["skipped"] == 1
    assert [(b["step"], b["guard_step"], b["layers"]) for b in cb.bad_steps] == [(1, 3, ["net.weight", "net.bias"])]
    rows = _csv_metrics(trainer)
    assert rows[1]["grad/skipped"] == 0.0  # the batch's last step, the one logged, was taken
    assert [s for s, r in sorted(rows.items()) if "grad/nonfinite/net.weight" in r] == [1]


class _Alternating(_TwoOptimizers):
    """The same two optimizers, one a batch in turn (a GAN's generator and critic); the first
    optimizer's first step sees a NaN."""

    def training_step(self, batch, i):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        opt, target = (opt_a, y.clone()) if i % 2 == 0 else (opt_b, y)
        if i == 0:
            target[0, 0] = math.nan
        opt.zero_grad()
        hidden = self.a(x) if i % 2 == 0 else self.a(x).detach()
        self.manual_backward(torch.nn.functional.mse_loss(self.b(hidden), target))
        opt.step()


def test_a_guard_that_did_not_step_logs_nothing_at_that_batch(tmp_path):
    # Lightning logs an on_step value again at every later logged batch until the epoch ends:
    # the first guard's skip at batch 0 was logged again at batch 1, where it did not step
    # (its grad/skipped summed to 2 for one skip), and so on for every odd batch.
    model, cb = _Alternating(), GradGuardCallback(max_norm=1.0)
    data = torch.utils.data.DataLoader([(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(6)], batch_size=None)
    trainer = _trainer(tmp_path, cb, max_steps=6)
    trainer.fit(model, data)
    assert [g.summary()["steps"] for g in cb.guards] == [3, 3]
    rows = _csv_metrics(trainer)
    first = [s for s, r in sorted(rows.items()) if "grad/skipped" in r]
    second = [s for s, r in sorted(rows.items()) if "grad/optimizer_1/skipped" in r]
    assert first == [0, 2, 4] and second == [1, 3, 5], rows
    assert sum(r["grad/skipped"] for r in rows.values() if "grad/skipped" in r) == 1.0
    assert rows[0]["grad/skipped"] == 1.0 and math.isnan(rows[0]["grad/total_norm"])
    assert trainer.callback_metrics["grad/skipped_total"] == 1.0  # the running count, still there


class _Schedule(Tiny):
    """A clipping schedule set through self.optimizers(), Lightning's wrapper of the guard."""

    def on_train_batch_start(self, batch, batch_idx):
        opt = self.optimizers()
        opt.max_norm = 0.5 / (batch_idx + 1)
        # Every setting reads through the wrapper as on the guard (model and process_group, read
        # from the guard's own __dict__, raised KeyError on Lightning's wrapper).
        self.seen = (opt.model is self, opt.process_group, opt.spike, opt.hygiene, opt.tracer, opt.norm_type,
                     opt.on_nonfinite, opt.max_consecutive_skips)


def test_a_max_norm_set_through_self_optimizers_reaches_the_guard(tmp_path):
    # Lightning's optimizer wrapper copies the guard's __dict__: the assignment reached the copy
    # only, and the guard went on clipping to its first limit.
    model, cb = _Schedule(bad_step=-1), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=3)
    trainer.fit(model, _loader())
    assert cb.guard.max_norm == 0.5 / 3
    assert model.seen == (True, None, None, True, None, 2.0, "skip", None), model.seen
    coefs = [float(h) for h in cb.guard.history.as_dict()["clip_coef"]]
    norms = [float(h) for h in cb.guard.history.as_dict()["total_norm"]]
    for k, (coef, norm) in enumerate(zip(coefs, norms)):
        assert coef == pytest.approx(min(1.0, 0.5 / (k + 1) / (norm + 1e-6)), rel=1e-5), (k, coefs, norms)


def test_each_guard_has_its_own_spike_statistics(tmp_path):
    """One spike policy given to the callback was shared by both optimizers' guards (their norms
    mixed into one mean) and carried from one fit into the next fit's fresh guards."""
    policy = gradguard.ZScoreClip(warmup=100)
    model, cb = _TwoOptimizers(), GradGuardCallback(max_norm=1.0, spike=policy)
    data = torch.utils.data.DataLoader([(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(3)], batch_size=None)
    _trainer(tmp_path, cb, max_steps=6).fit(model, data)
    a, b = cb.guards
    assert a.spike is not b.spike and policy._state is None
    # ZScore state: [mean, var, count of finite steps]; the second optimizer's NaN step is not counted.
    assert [float(g.spike._state[2]) for g in (a, b)] == [3.0, 2.0]
    _trainer(tmp_path, cb, max_steps=4, name="again").fit(model, data)
    assert [float(g.spike._state[2]) for g in cb.guards] == [2.0, 1.0]  # new guards, new statistics


def test_bf16_mixed(tmp_path):
    model, cb = Tiny(), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=5, precision="bf16-mixed")
    trainer.fit(model, _loader())
    _check_run(trainer, cb, model, 5)


@pytest.mark.parametrize("fused", [False, True])
def test_16_mixed_with_grad_scaler(tmp_path, fused):
    # Trainer(precision="16-mixed") on the CPU is turned into bf16-mixed by Lightning; the plugin
    # itself runs fp16 autocast with a real GradScaler on the CPU.
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    model, cb = Tiny(fused=fused), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=5, plugins=[plugin])
    trainer.fit(model, _loader())
    assert cb.guard.last.amp
    # The guard's norms are divided by the loss scale (a power of two): equal to the reference.
    _check_run(trainer, cb, model, 5, overflow=True)


def test_grad_scaler_overflows_are_bad_steps_that_say_so(tmp_path, caplog):
    # A scale too large for fp16 overflows until GradScaler has backed off: each such step was
    # warned about as "non-finite gradients in <every layer>", like a NaN in the data. GradScaler's
    # flag cannot tell the two apart, so they stay bad steps (filed as routine at INFO instead, a
    # NaN in every batch went unreported), but the warning says what GradScaler does about it, and
    # names the first few layers only.
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126)
    model, cb = Tiny(bad_step=-1), GradGuardCallback(max_norm=1.0)
    trainer = _trainer(tmp_path, cb, max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    with caplog.at_level(logging.INFO, logger="gradguard.integrations"):
        trainer.fit(model, _loader())
    s = cb.guard.summary()
    assert s["skipped"] == 6 and float(scaler.get_scale()) == 2.0 ** 120  # six back-offs
    assert [o["step"] for o in cb.bad_steps] == list(range(6)) and cb.overflow_steps == cb.bad_steps
    assert len(cb.bad_steps[0]["layers"]) == 4 and all(o["skipped"] for o in cb.bad_steps)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and r.name == "gradguard.integrations"]
    assert len(warned) == 6 and all("GradScaler overflow, non-finite scaled gradients in" in m
                                    and "GradScaler lowers the scale" in m for m in warned), warned
    rows = _csv_metrics(trainer)
    assert all(rows[step]["grad/amp_overflow"] == 1.0 and rows[step]["grad/skipped"] == 1.0 for step in range(6))
    assert all(rows[step]["grad/nonfinite/net.2.weight"] == 1.0 for step in range(6))


@pytest.mark.parametrize("trainer_kw", [{"logger": False}, {"barebones": True}], ids=["no_logger", "barebones"])
def test_no_logger_or_barebones_gives_no_self_log_warnings(tmp_path, trainer_kw, recwarn):
    # The callback's log_dict(..., logger=True) made Lightning warn at every logged step: "You
    # called `self.log(...)` but have no logger configured", or under barebones=True "You are
    # trying to `self.log()` but `Trainer(barebones=True)` is configured".
    model, cb = Tiny(), GradGuardCallback(max_norm=1.0)
    kw = dict(max_steps=5, callbacks=[cb], accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, **trainer_kw)
    if not trainer_kw.get("barebones"):
        kw["log_every_n_steps"] = 1
    trainer = pl.Trainer(**kw)
    trainer.fit(model, _loader())
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "self.log" in m], messages
    assert [b["step"] for b in cb.bad_steps] == [BAD]  # still checked and reported
    if not trainer_kw.get("barebones"):
        # Without a logger the metrics still reach callback_metrics (for a ModelCheckpoint or
        # EarlyStopping to monitor), as before.
        assert trainer.callback_metrics["grad/skipped_total"] == 1.0


def test_warns_when_the_module_clips_itself(tmp_path):
    class ClipsItself(Tiny):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            pass

    model = ClipsItself()
    with pytest.warns(UserWarning, match="overrides configure_gradient_clipping"):
        _trainer(tmp_path, GradGuardCallback(max_norm=1.0), max_steps=2).fit(model, _loader())


@pytest.mark.parametrize("clip", [None, 1.0])
def test_warns_that_the_lr_finder_runs_unguarded(tmp_path, clip):
    # Tuner.lr_find runs its search in LearningRateFinder.on_fit_start, before this callback's,
    # and with only its own callbacks: a NaN batch there was stepped on without a word.
    from lightning.pytorch.tuner import Tuner  # noqa: PLC0415

    model = Tiny(bad_step=-1)
    trainer = _trainer(tmp_path, GradGuardCallback(max_norm=1.0), max_steps=4, gradient_clip_val=clip)
    with pytest.warns(UserWarning, match="LearningRateFinder \\(Tuner\\) runs its training steps before the callback"):
        Tuner(trainer).lr_find(model, train_dataloaders=_loader(), num_training=3, update_attr=False)


def test_no_tuner_warning_without_a_tuner(tmp_path, recwarn):
    _trainer(tmp_path, GradGuardCallback(max_norm=1.0), max_steps=2).fit(Tiny(bad_step=-1), _loader())
    assert not [w for w in recwarn if "Tuner" in str(w.message)]


_DDP_LBFGS = '''
import math, sys, torch, lightning.pytorch as pl
from gradguard.integrations.lightning import GradGuardCallback

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.calls = 0
    def training_step(self, batch, i):
        x, y = batch
        self.calls += 1
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        if self.global_rank == 1 and self.calls == 2:
            loss = loss + math.inf  # a non-finite loss with finite gradients, on one rank
        return loss
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)
    def on_fit_end(self):
        w = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        print(f"rank {self.global_rank}: evaluations {self.calls}, skipped "
              f"{self.trainer.strategy.optimizers[0].summary()['skipped']}, params {w.tolist()}", flush=True)

if __name__ == "__main__":
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[GradGuardCallback()])
    t.fit(M(), torch.utils.data.DataLoader(ds, batch_size=4))
'''


def test_ddp_lbfgs_rolls_back_on_every_rank_for_one_ranks_loss(tmp_path):
    # DDP wraps the LightningModule the guard names its layers from: the ranks' agreement on an
    # LBFGS closure's loss found no DDP module, so rank 1 rolled back alone and rank 0 went on into
    # its third evaluation and died in DDP's backward ("Connection closed by peer").
    import subprocess
    import sys

    script = tmp_path / "ddp_lbfgs.py"
    script.write_text(_DDP_LBFGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(gradguard.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env,
                       cwd=str(tmp_path))
    import re

    # The two ranks print into one pipe: their lines may run together.
    got = sorted(re.findall(r"rank (\d): evaluations (\d+), skipped (\d+), params (\[[^\]]*\])", r.stdout))
    assert r.returncode == 0 and len(got) == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert [g[1:3] for g in got] == [("2", "1")] * 2 and got[0][3] == got[1][3], got


def test_settings_assigned_through_lightnings_wrapper_reach_the_guard():
    # LightningOptimizer subclasses the guard's class and forwards attribute reads to it: a
    # model (or process_group) assigned through it was bound on the wrapper, the guard kept its
    # plan and named param[i]; a spike policy went to the wrapper's ownership.
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    guard = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(4, 3)).sum().backward()
    guard.step()
    wrapper = LightningOptimizer(guard)
    wrapper.model = model
    pol = gradguard.ZScoreClip()
    wrapper.spike = pol
    wrapper.max_norm = 0.5
    assert not {"_limits", "_plan", "_fsdp_group", "_name_list"} & set(vars(wrapper)), vars(wrapper)
    guard.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    guard.step()
    assert guard.last.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert guard.spike is pol and pol._guard() is guard and guard.max_norm == 0.5
    guard.spike = pol  # its own policy again: fine
    wrapper.spike = None
    assert pol._guard() is None

"""The guarded step of a non-fused optimizer under a CUDA graph capture, run on the CPU.

A capture cannot hold the host read that tells a foreach/for-loop optimizer's step to be skipped,
so there the guard takes the inner step whatever the decision and rolls it back on the device
(GradGuard._rolled_back_step). That path is plain tensor code: these tests force it on the CPU
(``gradguard.optim._capturing`` patched to say "capturing") and compare it, bit for bit, with the
read path on the same gradient sequences. tests/test_cuda_graphs.py captures it for real where a
GPU exists.
"""
from __future__ import annotations

import math

import pytest
import torch

import gradguard
from gradguard import optim as guard_optim
from optim_util import OPTIMIZERS, make_grads, make_params, poison, set_grads, snapshot, assert_bit_identical

NON_FUSED = [k for k in OPTIMIZERS if not k.endswith("_fused")]


def _sequence(n: int):
    """Gradients of varying size, a NaN/Inf step, a huge one and a step after them."""
    seq = [make_grads(k, scale=(20.0 if k % 3 == 0 else 0.1)) for k in range(n)]
    seq[3] = poison(seq[3])
    seq[4] = [g * 1e30 for g in seq[4]]
    seq[6] = poison(seq[6])
    return seq


def _run(make_optimizer, guard_kwargs, capture_from, monkeypatch, steps=9):
    params = make_params(0)
    guard = gradguard.GradGuard(make_optimizer(params), hygiene=False, **guard_kwargs)
    seq = _sequence(steps)
    reports = []
    with monkeypatch.context() as m:
        for k, grads in enumerate(seq):
            set_grads(params, grads)
            m.setattr(guard_optim, "_capturing", lambda device, on=k >= capture_from: on)
            guard.step()
            reports.append((bool(guard.last.skipped), float(guard.last.clip_coef)))
    return params, guard, reports


@pytest.mark.parametrize("guard_kwargs", [dict(max_norm=1.0), dict(), dict(on_nonfinite="zero", max_norm=1.0),
                                          dict(on_nonfinite="ignore", max_norm=0.5),
                                          dict(max_norm=1.0, spike=gradguard.ZScoreClip(warmup=2))],
                         ids=["skip+clip", "skip", "zero+clip", "ignore+clip", "skip+zscore"])
@pytest.mark.parametrize("opt_name", NON_FUSED)
def test_rolled_back_steps_equal_read_steps_bit_for_bit(opt_name, guard_kwargs, monkeypatch):
    # Two eager warm-up steps create the optimizer's state, as before a real capture.
    # A policy of its own for each guard (the parametrized one would carry one test's statistics
    # into the next; a second guard built with it is refused).
    fresh = {"spike": gradguard.ZScoreClip(warmup=2)} if "spike" in guard_kwargs else {}
    kw_a = {**guard_kwargs, **fresh}
    kw_b = {**guard_kwargs, "spike": gradguard.ZScoreClip(warmup=2)} if "spike" in guard_kwargs else dict(guard_kwargs)
    pa, ga, ra = _run(OPTIMIZERS[opt_name], kw_a, capture_from=2, monkeypatch=monkeypatch)
    pb, gb, rb = _run(OPTIMIZERS[opt_name], kw_b, capture_from=10**9, monkeypatch=monkeypatch)
    assert [r[0] for r in ra] == [r[0] for r in rb]
    if guard_kwargs.get("on_nonfinite", "skip") == "skip":
        assert [r[0] for r in ra] == [False, False, False, True, False, False, True, False, False]
    assert str([r[1] for r in ra]) == str([r[1] for r in rb])
    if guard_kwargs.get("on_nonfinite") == "ignore":  # NaN reaches the parameters: compare NaN-aware
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert_bit_identical(snapshot(pa, ga.optimizer), snapshot(pb, gb.optimizer))
    assert torch.equal(ga._state.counters, gb._state.counters)
    assert ga.summary() == gb.summary()


MORE = {
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, foreach=True),
    "nadam_decoupled": lambda ps: torch.optim.NAdam(ps, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, foreach=False),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=1e-2, t0=2),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5),
    "adam_amsgrad_maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, maximize=True, foreach=True),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
}
if hasattr(torch.optim, "Adafactor"):
    MORE["adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=1e-2)


@pytest.mark.parametrize("name", sorted(MORE))
def test_rolled_back_steps_equal_read_steps_for_more_optimizers(name, monkeypatch):
    pa, ga, ra = _run(MORE[name], dict(max_norm=1.0), capture_from=2, monkeypatch=monkeypatch)
    pb, gb, rb = _run(MORE[name], dict(max_norm=1.0), capture_from=10**9, monkeypatch=monkeypatch)
    assert [r[0] for r in ra] == [r[0] for r in rb] == [False, False, False, True, False, False, True, False, False]
    assert_bit_identical(snapshot(pa, ga.optimizer), snapshot(pb, gb.optimizer))


def test_a_rolled_back_skip_restores_every_bit(monkeypatch):
    # The step itself runs (and would write NaN everywhere): the select puts back the saved bits,
    # signed zeros and all.
    params = make_params(0)
    guard = gradguard.GradGuard(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True), max_norm=1.0)
    set_grads(params, make_grads(0))
    guard.step()
    with torch.no_grad():
        params[1][0] = -0.0
    before = snapshot(params, guard.optimizer)
    set_grads(params, poison(make_grads(1)))
    calls = []
    inner_step = guard.optimizer.step
    monkeypatch.setattr(guard.optimizer, "step", lambda *a, **k: (calls.append(1), inner_step(*a, **k))[1])
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    guard.step()
    assert calls == [1], "the inner step must run under a capture"
    assert bool(guard.last.skipped)
    after = snapshot(params, guard.optimizer)
    assert_bit_identical(before, after)
    assert math.copysign(1.0, float(params[1][0])) == -1.0


@pytest.mark.parametrize("kwargs, what", [(dict(on_nonfinite="raise"), "on_nonfinite='raise'"),
                                          (dict(max_consecutive_skips=3), "max_consecutive_skips")])
@pytest.mark.parametrize("opt_name", ["adamw_foreach", "adamw_fused"])
def test_options_that_need_a_host_read_are_refused_before_anything_is_recorded(opt_name, kwargs, what, monkeypatch):
    params = make_params(0)
    guard = gradguard.GradGuard(OPTIMIZERS[opt_name](params), **kwargs)
    set_grads(params, make_grads(0))
    guard.step()
    counters = guard._state.counters.clone()
    before = snapshot(params, guard.optimizer)
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    set_grads(params, make_grads(1))
    with pytest.raises(RuntimeError, match=f"{what}.*CUDA graph capture"):
        guard.step()
    assert torch.equal(guard._state.counters, counters)
    assert_bit_identical(before, snapshot(params, guard.optimizer))


def _scaler_run(capture_from: int, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    guard = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True), max_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(1)
    skipped = []
    with monkeypatch.context() as m:
        for i in range(8):
            x = torch.randn(16, 8, generator=gen)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            if i in (3, 5):
                loss = loss * float("inf")  # an overflow, as the scaler sees one
            guard.zero_grad()
            scaler.scale(loss).backward()
            m.setattr(guard_optim, "_capturing", lambda device, on=i >= capture_from: on)
            scaler.step(guard)
            scaler.update()
            skipped.append(bool(guard.last.skipped))
    return model, guard, scaler, skipped


def test_rolled_back_steps_under_gradscaler_equal_read_steps(monkeypatch):
    ma, ga, sa, ka = _scaler_run(2, monkeypatch)
    mb, gb, sb, kb = _scaler_run(10**9, monkeypatch)
    assert ka == kb == [False, False, False, True, False, True, False, False]
    assert sa.get_scale() == sb.get_scale()
    assert_bit_identical(snapshot(list(ma.parameters()), ga.optimizer), snapshot(list(mb.parameters()), gb.optimizer))
    assert torch.equal(ga._state.counters, gb._state.counters)


def _warm_guard(opt_factory, steps=1, **kw):
    params = make_params(0)
    guard = gradguard.GradGuard(opt_factory(params), max_norm=1.0, **kw)
    for k in range(steps):
        set_grads(params, make_grads(k))
        guard.step()
    return params, guard


def test_inner_post_hooks_run_after_the_select_and_never_see_an_undone_step(monkeypatch):
    params, guard = _warm_guard(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True))
    seen = []

    def hook(opt, args, kwargs):
        assert opt is guard.optimizer and args[0] is opt and kwargs == {}
        seen.append(all(bool(torch.isfinite(p).all()) for p in params))

    guard.optimizer.register_step_post_hook(hook)
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    for k in range(1, 6):
        set_grads(params, poison(make_grads(k)) if k in (2, 4) else make_grads(k))
        guard.step()
    assert seen == [True] * 5  # once per step, skipped ones included, always on restored parameters
    assert len(guard.optimizer._optimizer_step_post_hooks) == 1


def test_a_capture_refused_at_the_first_step_allocates_and_records_nothing(monkeypatch):
    params = make_params(0)
    guard = gradguard.GradGuard(torch.optim.Adam(params, lr=1e-2, foreach=True), max_norm=1.0)
    set_grads(params, make_grads(0))
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        guard.step()
    assert guard._state.counters is None and not guard.optimizer.state and guard.history.as_dict()["step"] == []


def test_a_fused_optimizer_whose_state_is_incomplete_is_refused_before_anything_runs(monkeypatch):
    params = make_params(0)
    guard = gradguard.GradGuard(torch.optim.Adam(params, lr=1e-2, fused=True), max_norm=1.0)
    set_grads(params, [make_grads(0)[0], None, None])  # warm-up creates state for the first param only
    guard.step()
    before = snapshot(params, guard.optimizer)
    counters = guard._state.counters.clone()
    set_grads(params, make_grads(1))
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        guard.step()
    assert_bit_identical(before, snapshot(params, guard.optimizer))
    assert torch.equal(guard._state.counters, counters)


def test_state_created_for_a_new_gradient_is_refused_and_undone(monkeypatch):
    params = make_params(0)
    guard = gradguard.GradGuard(torch.optim.Adam(params, lr=1e-2, foreach=True), max_norm=1.0)
    set_grads(params, [make_grads(0)[0], None, make_grads(0)[2]])
    guard.step()
    before = snapshot(params, guard.optimizer)
    set_grads(params, make_grads(1))  # params[1] gets its first gradient under the capture
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="created or replaced state"):
        guard.step()
    assert params[1] not in guard.optimizer.state
    assert_bit_identical(before, snapshot(params, guard.optimizer))


class _CountingSGD(torch.optim.SGD):
    """Keeps a step counter in its param group (as some optimizers do): a replay could not undo it."""

    def step(self, closure=None):
        for g in self.param_groups:
            g["k"] = g.get("k", 0) + 1
        return super().step(closure)


def test_a_step_that_changes_its_param_groups_is_refused_and_undone(monkeypatch):
    params, guard = _warm_guard(lambda ps: _CountingSGD(ps, lr=0.1, momentum=0.9, foreach=True))
    before = snapshot(params, guard.optimizer)
    assert guard.optimizer.param_groups[0]["k"] == 1
    set_grads(params, make_grads(1))
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="param groups"):
        guard.step()
    assert guard.optimizer.param_groups[0]["k"] == 1
    assert_bit_identical(before, snapshot(params, guard.optimizer))


def test_global_post_hooks_run_once_after_the_rollback_under_capture(monkeypatch):
    # They ran inside the inner step, on the parameters of a step then rolled back, so a capture
    # with one registered was refused; they now run once, around the guard's step, after it.
    params, guard = _warm_guard(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True))
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    seen = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: seen.append((type(opt).__name__, all(bool(torch.isfinite(p).all()) for p in params))))
    try:
        for k in range(1, 4):
            set_grads(params, poison(make_grads(k)) if k == 2 else make_grads(k))
            guard.step()
    finally:
        handle.remove()
    assert seen == [("GradGuard", True)] * 3, seen


def test_an_inner_zero_optimizer_is_refused_under_capture(monkeypatch):
    params, guard = _warm_guard(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True))
    set_grads(params, make_grads(1))
    monkeypatch.setattr(guard_optim, "_capturing", lambda device: True)
    # An inner ZeroRedundancyOptimizer (the guard's decide group is what marks it).
    monkeypatch.setattr(guard, "_decide_group", object())
    with pytest.raises(RuntimeError, match="ZeroRedundancyOptimizer"):
        guard.step()


def _replay_decisions(guard, params, k: int) -> None:
    """What a replay of a captured guarded step does to the guard's bookkeeping, with no Python:
    the recorded decision op runs on the guard's state tensors (the stats and the step besides it
    do not matter to the numbering)."""
    st = guard._state
    grads = [p.grad for p in params]
    for _ in range(k):
        acc, nan, inf, amax = torch.ops.gradguard.multi_tensor_stats(grads, 2.0)
        torch.ops.gradguard.guard_decide(acc, nan, inf, amax, None, None, None, None, st.counters,
                                         st.layer_nonfinite, st.layer_max_norm, None, st.history.values(acc.device),
                                         2.0, guard.max_norm, "skip", "none", [], False)


def test_steps_are_numbered_on_the_device_from_the_first_capture_on(monkeypatch):
    # Replays run no Python: an eager step after them must take its number (and its history
    # row's label) from the device's count. Counted on the host, it was numbered 5, not 7.
    params, guard = _warm_guard(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), steps=2)
    assert guard.last.step == 2
    set_grads(params, make_grads(2))
    with monkeypatch.context() as m:
        m.setattr(guard_optim, "_capturing", lambda device: True)
        guard.step()
    assert guard.last.step == 3  # the CPU runs what a GPU capture would only record
    _replay_decisions(guard, params, 3)
    set_grads(params, make_grads(3))
    guard.step()
    report = guard.last
    assert len(guard.history) == 7 and guard.history.count == 7  # read from the device
    assert report.step == 7 and report.as_dict()["step"] == 7
    h = guard.history.as_dict()
    assert h["step"] == [1, 2, 3, 4, 5, 6, 7]
    assert h["total_norm"][-1] == float(report.total_norm)  # the eager step's row, in its own slot
    assert guard.summary()["steps"] == 7
    sd = guard.state_dict()
    assert sd["gradguard"]["steps"] == 7
    # A checkpoint of it continues the count on a guard that was never captured (host-numbered).
    params2 = make_params(0)
    fresh = gradguard.GradGuard(torch.optim.SGD(params2, lr=0.1, momentum=0.9, foreach=True), max_norm=1.0)
    fresh.load_state_dict(sd)
    set_grads(params2, make_grads(4))
    fresh.step()
    assert fresh.last._step == 8 and fresh.history.as_dict()["step"] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_step_hook_reads_the_step_number_during_a_capture_without_a_device_read(monkeypatch):
    # Under a real capture a device-to-host copy fails the capture: a hook reading report.step
    # (TensorBoardHook's every-N filter) gets the number the host knows.
    params, guard = _warm_guard(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), steps=2)
    seen = []
    guard.add_step_hook(lambda g, report: seen.append((report.step, report._host)))
    set_grads(params, make_grads(2))
    with monkeypatch.context() as m:
        m.setattr(guard_optim, "_capturing", lambda device: True)
        guard.step()
        assert guard.last.step == 3 and guard.last._host is None
    assert seen[-1] == (3, None)
    # Outside the capture: read from the report's scalars, afresh each time (on a GPU every
    # replay rewrites them: a cached first read froze the number).
    assert guard.last.step == 3
    guard.last.scalars[8] = 11.0  # what a later replay leaves there
    assert guard.last.step == 11


def test_an_lbfgs_rollback_marks_its_own_history_row_once_numbered_on_the_device(monkeypatch):
    # LBFGS marked the row at the host's count, which stops at the first capture: it flagged an
    # earlier, good step as skipped and left the rolled-back one unflagged.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    guard = gradguard.GradGuard(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), hygiene=False)
    calls, bad = [0], [None]

    def closure():
        calls[0] += 1
        guard.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if calls[0] == bad[0]:
            loss = loss * float("nan")
        loss.backward()
        return loss

    guard.step(closure)
    guard.step(closure)
    closure()
    with monkeypatch.context() as m:  # a capture that fails after its decision was recorded
        m.setattr(guard_optim, "_capturing", lambda device: True)
        m.setattr(guard, "_check_capturable", lambda *args: None)

        def fails(*args):
            raise RuntimeError("the captured step failed")

        m.setattr(guard, "_rolled_back_step", fails)
        with pytest.raises(RuntimeError, match="the captured step failed"):
            guard.step(closure)
    calls[0], bad[0] = 0, 2
    before = [p.detach().clone() for p in model.parameters()]
    guard.step(closure)
    assert bool(guard.last.skipped) and guard.last.step == 4
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    h = guard.history.as_dict()
    assert h["step"] == [1, 2, 3, 4] and h["skipped"] == [False, False, False, True]
    assert guard.summary()["skipped"] == 1

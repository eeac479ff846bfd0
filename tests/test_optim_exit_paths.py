"""GradGuard on the paths that used to leave it broken or say nothing useful (issue 10): a raising
step under GradScaler, a step under inference_mode, bad max_norm tensors, huge history sizes,
truncated or mismatched checkpoints, raising hooks, GradScaler warm-up overflows, bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

import gradguard
from gradguard import GradGuard, NonFiniteGradError
from optim_util import TinyNet, make_grads, make_params, set_grads


def _scaled_step(model, opt, scaler, scale_loss=1.0):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    loss = model(x).pow(2).mean() * scale_loss
    scaler.scale(loss).backward()
    scaler.step(opt)


def test_grad_scaler_attributes_are_removed_when_step_raises():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def boom(guard, report):
        raise RuntimeError("hook failed")

    handle = opt.add_step_hook(boom)
    with pytest.raises(RuntimeError, match="hook failed"):
        _scaled_step(model, opt, scaler)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    handle.remove()
    # Without the scaler, a later finite step is an ordinary step again (a stale flag skipped it).
    opt.zero_grad()
    set_grads(list(model.parameters()), [torch.ones_like(p) for p in model.parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert not bool(opt.last.skipped) and not opt.last.amp
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_load_state_dict_drops_a_stale_scale_and_flag():
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1))
    sd = opt.state_dict()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.load_state_dict(sd)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


def test_one_step_under_inference_mode_leaves_the_guard_usable():
    params, ref = make_params(), make_params()
    opt = GradGuard(torch.optim.AdamW(params, lr=1e-2), max_norm=1.0)
    ref_opt = GradGuard(torch.optim.AdamW(ref, lr=1e-2), max_norm=1.0)
    for i in range(3):
        set_grads(params, make_grads(i))
        set_grads(ref, make_grads(i))
        if i == 0:
            with torch.inference_mode():
                opt.step()
        else:
            opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
    assert opt.summary()["steps"] == 3


@pytest.mark.parametrize("bad,match", [(torch.tensor(-1.0), "non-negative"), (torch.tensor(math.nan), "non-negative"),
                                       (torch.tensor([1.0, 2.0]), r"one-element.*shape \(2,\)"),
                                       (torch.tensor(True), "one-element real tensor")])
def test_bad_tensor_max_norm_is_refused_up_front(bad, match):
    with pytest.raises(ValueError, match="`max_norm`.*" + match):
        GradGuard(torch.optim.SGD(make_params(), lr=0.1), max_norm=bad)
    params = make_params()
    set_grads(params, make_grads(0))
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="`max_norm`"):
        gradguard.clip_grad_norm_(params, bad)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))


def test_one_element_tensor_max_norm_is_a_limit():
    a, b = make_params(), make_params()
    opt_a = GradGuard(torch.optim.SGD(a, lr=0.1), max_norm=torch.tensor([0.5]))
    opt_b = GradGuard(torch.optim.SGD(b, lr=0.1), max_norm=0.5)
    set_grads(a, make_grads(0, scale=10.0))
    set_grads(b, make_grads(0, scale=10.0))
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    assert float(opt_a.last.clip_coef) < 1.0


def test_history_size_has_a_bound():
    with pytest.raises(ValueError, match="`history_size` must be an int in"):
        GradGuard(torch.optim.SGD(make_params(), lr=0.1), history_size=10 ** 9)


def test_history_size_takes_any_integer_type():
    # As max_consecutive_skips and the spike policies' integers do (a numpy integer was refused).
    import numpy as np
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1), history_size=np.int64(3))
    assert opt.history.size == 3 and type(opt.history.size) is int
    with pytest.raises(ValueError, match="`history_size` must be an int in"):
        GradGuard(torch.optim.SGD(make_params(), lr=0.1), history_size=3.0)


def test_truncated_guard_state_is_a_clear_error():
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1))
    sd = opt.state_dict()
    del sd["gradguard"]["spike"]
    del sd["gradguard"]["history"]["values"]
    with pytest.raises(ValueError, match=r"incomplete \(missing spike, history.values\)"):
        opt.load_state_dict(sd)


def test_checkpoint_does_not_silently_change_the_spike_hyperparameters():
    params = make_params()
    saved = GradGuard(torch.optim.SGD(params, lr=0.1), spike=gradguard.ZScoreClip(z=1.5))
    set_grads(params, make_grads(0))
    saved.step()
    sd = saved.state_dict()
    policy = gradguard.ZScoreClip(z=9.0)
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1), spike=policy)
    with pytest.raises(ValueError, match=r"z=1\.5 \(this guard: 9\.0\)"):
        opt.load_state_dict(sd)
    assert policy.z == 9.0
    sd["gradguard"]["spike"] = None  # the way out the message names
    opt.load_state_dict(sd)
    assert policy.z == 9.0


def test_a_raising_hook_does_not_hide_the_nonfinite_error():
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1), on_nonfinite="raise", names=["a", "b", "c"])
    opt.add_step_hook(lambda guard, report: 1 / 0)
    grads = make_grads(0)
    grads[1][0] = math.nan
    set_grads(params, grads)
    with pytest.raises(NonFiniteGradError, match=r"'b'|b \(1 NaN") as info:
        opt.step()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "a step hook also raised ZeroDivisionError" in str(info.value)


def test_grad_scaler_warmup_overflows_do_not_count_as_consecutive_skips():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GradGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, max_consecutive_skips=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # overflows until it has backed off
    overflows = []
    for _ in range(6):
        _scaled_step(model, opt, scaler, scale_loss=1e10)
        scaler.update()
        overflows.append(opt.last.as_dict()["amp_overflow"])
        opt.zero_grad()
    assert overflows[:4] == [True] * 4  # four overflows in a row and no NonFiniteGradError
    assert opt.summary()["skipped"] == sum(overflows)
    assert opt.summary()["consecutive_skips"] == 0
    # A bad step of the model itself (no scaler) still counts.
    params = make_params()
    plain = GradGuard(torch.optim.SGD(params, lr=0.1), max_consecutive_skips=2)
    for i in range(2):
        grads = make_grads(i)
        grads[0][0, 0] = math.inf
        set_grads(params, grads)
        if i == 1:
            with pytest.raises(NonFiniteGradError, match="2 steps in a row"):
                plain.step()
        else:
            plain.step()
            assert plain.last.as_dict()["amp_overflow"] is False


def test_argument_errors_name_the_argument():
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1))
    with pytest.raises(ValueError, match="`k` must be an int >= 0"):
        opt.summary(k=-1)
    with pytest.raises(TypeError, match="`hygiene` must be True or False"):
        GradGuard(torch.optim.SGD(make_params(), lr=0.1), hygiene="no")


class _Interrupt(BaseException):
    """A KeyboardInterrupt-like exception (a notebook cell stopped), raised once from a hook."""


def _interrupted_scaler_step(guarded: bool, hook_on: str, monkeypatch, fused: bool = False, interrupt: bool = True):
    # fused: AdamW(fused=True) decided on the device (the GPU path, emulated); else SGD, which
    # the host decides on every path but a CUDA graph capture.
    monkeypatch.setattr(GradGuard, "_decide_on_host_on_cpu", not fused)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(
        model.parameters(), lr=0.1)
    opt = GradGuard(inner, max_norm=100.0, model=model) if guarded else inner
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    fire = [interrupt]

    def hook(o, args, kwargs):
        if fire[0]:
            fire[0] = False
            raise _Interrupt()

    (inner if hook_on == "inner" else opt).register_step_pre_hook(hook)
    before = model.weight.detach().clone()
    scaler.scale((model(torch.ones(2, 4)) ** 2).sum()).backward()
    if interrupt:
        with pytest.raises(_Interrupt):
            scaler.step(opt)
    return model, opt, scaler, before


@pytest.mark.parametrize("fused", [False, True])
def test_a_retried_scaler_step_after_an_interrupted_inner_step_unscales_once(fused, monkeypatch):
    # The guard had unscaled .grad in place when the inner step raised; GradScaler's stage stayed
    # READY, and the retry divided the grads by the scale again (an update 1/1024 of torch's).
    # (A fused AdamW's first step is decided on the host and unscales .grad in place too, until
    # its state exists.) The retried update equals the uninterrupted one; for SGD also plain
    # torch's retry (torch's own retried fused AdamW moves by ~4e-6 relative: not compared).
    updates = {}
    for guarded, interrupt in ((True, False), (True, True), (False, True)):
        model, opt, scaler, before = _interrupted_scaler_step(guarded, "inner", monkeypatch, fused, interrupt)
        scaler.step(opt)  # the retry, or the one step
        scaler.update()
        updates[guarded, interrupt] = model.weight.detach() - before
    assert torch.equal(updates[True, True], updates[True, False])
    if not fused:
        torch.testing.assert_close(updates[True, True], updates[False, True], rtol=1e-6, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_retry_after_a_new_backward_unscales_the_new_gradients(set_to_none, monkeypatch):
    # The remembered unscaled gradients count only while untouched: a backward since makes them
    # scaled gradients again.
    model, opt, scaler, before = _interrupted_scaler_step(True, "inner", monkeypatch)
    opt.zero_grad(set_to_none=set_to_none)  # new tensors, or the same ones written again
    scaler.scale((model(torch.ones(2, 4)) ** 2).sum()).backward()
    grads = [p.grad.clone() / 2.0 ** 10 for p in model.parameters()]
    scaler.step(opt)
    for p, g, b in zip(model.parameters(), grads, [before, None]):
        if b is not None:
            torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_a_raising_step_pre_hook_leaves_no_scaler_attributes(fused, monkeypatch):
    # The cleanup was in step(): a pre-hook runs before it, and the next plain step took the
    # unscaled gradients as scaled by 1024 (a norm of 0.00618 for 6.33).
    model, opt, scaler, before = _interrupted_scaler_step(True, "guard", monkeypatch, fused)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_a_scaled_step_keeps_no_gradient_alive():
    # The retry bookkeeping above held the step's gradient list until the next step: under
    # GradScaler a second copy of every gradient through the next forward and backward.
    import weakref

    model = torch.nn.Linear(4, 1)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale((model(torch.ones(2, 4)) ** 2).sum()).backward()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    assert all(r() is None for r in refs)

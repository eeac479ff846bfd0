"""GradGuard with the rest of torch's training loop: LR schedulers, GradScaler, autocast."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from gradguard import GradGuard
from optim_util import TinyNet, decide_on, make_grads, make_params, set_grads  # noqa: F401


def test_lr_scheduler_drives_the_shared_groups_without_warnings():
    params, ref_params = make_params(), make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=1.0, momentum=0.9), max_norm=1.0)
    ref = torch.optim.SGD(ref_params, lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for i in range(6):
            set_grads(params, make_grads(i))
            opt.step()
            sched.step()
            set_grads(ref_params, make_grads(i))
            torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
            ref.step()
            ref_sched.step()
            lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert sched.get_last_lr() == ref_sched.get_last_lr()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # The scheduler's state round-trips next to the guard's.
    sched.load_state_dict(sched.state_dict())


def _amp_run(guarded: bool, fused: bool, *, dtype=torch.float16, overflow_at=(), clip=None, unscale_first=False,
             steps=8, on_nonfinite="skip"):
    torch.manual_seed(0)
    model = TinyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
    opt = GradGuard(inner, max_norm=clip, model=model, on_nonfinite=on_nonfinite) if guarded else inner
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(1)
    scales, losses = [], []
    for i in range(steps):
        x = torch.randn(16, 8, generator=gen)
        y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]  # a fixed teacher, so the loss can go down
        with torch.autocast("cpu", dtype=dtype):
            loss = (model(x) - y).pow(2).mean()
        losses.append(float(loss.detach()))
        if i in overflow_at:
            loss = loss * float("inf")  # what an fp16 overflow in backward looks like to the scaler
        scaler.scale(loss).backward()
        if unscale_first or (clip is not None and not guarded):
            scaler.unscale_(opt)
            if not guarded:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
    return model, opt, scales, losses


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_grad_scaler_overflow_is_one_skip_and_matches_the_unguarded_scaler(fused, decide_on):
    guarded, opt, scales, _ = _amp_run(True, fused, overflow_at=(3,))
    bare, _, bare_scales, _ = _amp_run(False, fused, overflow_at=(3,))
    # No clipping: the guard hands the scaler's own scale and flag to the step, so the run is
    # bit-identical to the unguarded GradScaler loop, overflow included.
    for p, q in zip(guarded.parameters(), bare.parameters()):
        assert torch.equal(p, q)
    assert scales == bare_scales and scales[3] == scales[2] / 2  # the scaler backed off once
    assert opt.history.as_dict()["skipped"] == [i == 3 for i in range(8)]
    assert opt.summary()["skipped"] == 1 and opt.summary()["nonfinite_steps"] == 1  # counted once
    assert opt.last.amp and not bool(opt.last.skipped)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale_first"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_grad_scaler_with_clipping_matches_the_pytorch_recipe(fused, unscale_first, decide_on):
    guarded, opt, _, _ = _amp_run(True, fused, clip=0.5, unscale_first=unscale_first)
    ref, _, _, _ = _amp_run(False, fused, clip=0.5)  # unscale_, clip_grad_norm_, step
    for p, q in zip(guarded.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.summary()["clipped"] == 8
    # Reported norms are those of the unscaled gradients.
    assert 0.5 < float(opt.last.total_norm) < 50.0


def test_grad_scaler_overflow_skips_even_in_raise_and_zero_modes(decide_on):
    # An overflow is the scaler's business (it lowers the scale): the guard skips, never raises.
    for mode in ("raise", "zero", "ignore"):
        model, opt, scales, _ = _amp_run(True, True, overflow_at=(2,), on_nonfinite=mode, steps=4)
        assert opt.history.as_dict()["skipped"] == [False, False, True, False], mode
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_loop_with_scaler_and_guard_trains(dtype):
    model, opt, _, losses = _amp_run(True, True, dtype=dtype, clip=1.0, steps=40, overflow_at=(5, 17))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-5:]) < sum(losses[:5])
    assert opt.summary()["skipped"] == 2


def test_scaler_flag_summed_over_devices_is_clamped(decide_on):
    # GradScaler hands over found_inf summed over devices (2.0 when two overflowed); the fused
    # kernels skip only on exactly 1.0, so the guard must clamp, not pass it on.
    params = make_params()
    opt = GradGuard(torch.optim.AdamW(params, lr=1e-2, fused=True))
    set_grads(params, make_grads(0))
    opt.step()
    set_grads(params, make_grads(1))
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.tensor(2.0)
    opt.grad_scale = None
    try:
        opt.step()
    finally:
        del opt.found_inf, opt.grad_scale
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert bool(opt.last.skipped) and float(opt.last.found_inf) == 1.0 and opt.last.amp


@pytest.mark.parametrize("scale", [0.0, 1e-40], ids=["zero", "below_float32s_inverse_range"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_a_loss_scale_backed_off_to_nothing_skips_the_step(scale, fused, max_norm, decide_on):
    # ~150 overflow steps in a row halve GradScaler's scale to 0 (or a subnormal); the next clean
    # step's unscaled gradients are then NaN/Inf (or their multiplier overflows float32), and the
    # guard took that step: every weight became Inf/NaN, on a report saying "not skipped".
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    g = GradGuard(torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused), max_norm=max_norm)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.zeros(()))
    scaler.update(new_scale=torch.tensor(scale))
    scaler.scale(m(torch.randn(3, 4)).pow(2).mean()).backward()
    before = [p.detach().clone() for p in m.parameters()]
    scaler.step(g)
    scaler.update()
    assert bool(g.last.skipped) and bool(g.last.found_inf) and not bool(g.last.amp_overflow)
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64,), (torch.bfloat16, torch.float64)],
                         ids=["float32+float64", "float64", "bfloat16+float64"])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_a_loss_scale_whose_inverse_overflows_float32_skips_with_a_float64_parameter_too(dtypes, max_norm, decide_on):
    # With a float64 parameter the decision is taken in float64, where 1/1e-40 does not overflow:
    # the step was taken, and the float32 gradients multiplied by that inverse rounded to float32
    # (inf): every float32 weight went to -inf. GradScaler's own unscale_ takes the inverse in
    # float32 for every dtype, so the guard judges it there too, and skips.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, dtype=dt)) for dt in dtypes]
    g = GradGuard(torch.optim.SGD(params, lr=0.1), max_norm=max_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e-40)
    scaler.scale(sum((p.double() * (k + 2.0)).sum() for k, p in enumerate(params))).backward()
    before = [p.detach().clone() for p in params]
    scaler.step(g)
    scaler.update()
    assert bool(g.last.skipped) and bool(g.last.found_inf)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_a_scaled_norm_that_overflows_is_judged_unscaled(decide_on):
    # Finite scaled gradients whose scaled norm overflows float32 while the unscaled norm does
    # not: GradScaler sees no overflow, and the guard skipped every such step.
    w = torch.nn.Parameter(torch.zeros(4))
    g = GradGuard(torch.optim.SGD([w], lr=1e-40))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.zeros(()))  # makes the scale tensor
    w.grad = torch.full((4,), 2e38)  # as if scaled by 2**16: the unscaled norm is ~6.1e33
    scaler.step(g)
    assert not bool(g.last.skipped) and not bool(g.last.found_inf)
    assert float(g.last.total_norm) == pytest.approx(4e38 / 2.0 ** 16, rel=1e-6)


@pytest.mark.parametrize("finite", [False, True], ids=["nan_every_step", "finite_grads"])
def test_max_consecutive_skips_fires_once_the_scale_cannot_be_undone(finite, decide_on):
    # A NaN in every batch sets GradScaler's flag on every step, and overflow skips do not count
    # toward max_consecutive_skips: the scale backed off to 0 and the run skipped forever without
    # a word. Once the scale is too small to undo (its inverse overflows float32), the skips count.
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    g = GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), max_consecutive_skips=2, model=m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -125)  # 2**-128's inverse overflows
    x = torch.randn(4, 3)
    if not finite:
        x[0, 0] = float("nan")
    else:
        scaler.scale(torch.zeros(()))
        scaler.update(new_scale=torch.tensor(0.0))  # finite gradients, a scale of 0
    before = [p.detach().clone() for p in m.parameters()]
    steps = 0
    with pytest.raises(Exception) as info:
        for steps in range(1, 20):
            scaler.scale(m(x).sum()).backward()
            scaler.step(g)
            scaler.update()
            g.zero_grad()
    assert type(info.value).__name__ == "NonFiniteGradError", info.value
    msg = str(info.value)
    assert "2 steps in a row were skipped" in msg and "the loss scale is" in msg, msg
    assert "weight (" in msg if not finite else "every scaled gradient element is finite" in msg
    assert steps == (5 if not finite else 2), steps  # -125, -126, -127 overflow only; -128, -129 count
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_an_infinite_loss_scale_cannot_be_undone_either(decide_on):
    # inf * 0.5 is inf: GradScaler(init_scale=inf) flagged an overflow on every step and backed off
    # to inf again, and the skips never counted.
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    g = GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), max_consecutive_skips=3, model=m)
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    with pytest.raises(Exception, match="3 steps in a row were skipped.*the loss scale is inf"):
        for _ in range(10):
            scaler.scale(m(torch.randn(4, 3)).sum()).backward()
            scaler.step(g)
            scaler.update()
            g.zero_grad()


@pytest.mark.parametrize("exponent", [16, 124, 127])
def test_a_huge_loss_scale_with_a_small_clip_coefficient_clips_a_fused_step(exponent, decide_on):
    # grad_scale = loss_scale / clip_coef is float32: a GradScaler scale grown to 2^124 (about
    # 216k overflow-free steps, as with float32/bfloat16 gradients) over a coefficient below 1/16
    # made it inf, and the fused kernel zeroed the gradients of a step reported as clipped. There
    # guard_decide's pre_scale clips first and grad_scale is the loss scale alone.
    p, q = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.ones(64))
    opt = GradGuard(torch.optim.AdamW([p], lr=0.1, fused=True), max_norm=0.4, hygiene=False)
    ref = torch.optim.AdamW([q], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** exponent, growth_interval=10 ** 9)
    g = torch.ones(64)  # norm 8: a clip coefficient of 0.05
    for _ in range(3):
        scaler.scale((p * g).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        q.grad = g * (0.4 / (8 + 1e-6))
        ref.step()
        assert not bool(opt.last.skipped) and float(opt.last.clip_coef) < 0.06
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("inner", ["sgd", "adam_fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_skipped_overflow_step_leaves_the_grads_as_the_readme_says(inner, dtype, decide_on):
    # README (GradScaler): a skipped step leaves the gradients scaled, for inspection, except
    # where the step is decided on the device without a read (float64 parameters of a fused
    # optimizer there): the multiplier pass then runs and only unscales. Parameters and state
    # are untouched either way.
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "adam_fused": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True)}[inner]
    opt = GradGuard(make([p]), max_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(2):
        p.grad = scaler.scale(torch.tensor([1.0, 2.0, math.inf if step else 3.0], dtype=dtype))
        before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
        scaler.step(opt)
        scaler.update()
    assert opt.last.skipped_if_known() in (True, None) and bool(opt.last.skipped)
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    unscaled = decide_on == "device" and inner == "adam_fused" and dtype == torch.float64
    want = [1.0, 2.0, math.inf] if unscaled else [1024.0, 2048.0, math.inf]
    assert p.grad.tolist() == want

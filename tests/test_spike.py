"""Spike policies on a synthetic norm sequence, against plain-Python reimplementations."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import gradguard
from gradguard import GradGuard


def _norm_sequence():
    # Steady norms around 1 with some wobble, two spikes and a NaN step.
    seq = [1.0 + 0.1 * math.sin(0.7 * i) for i in range(40)]
    seq[30], seq[35] = 10.0, 6.0
    seq[33] = math.nan
    return seq


def _drive(policy, seq, max_norm=None):
    """Feeds the guard a gradient whose norm is each value of seq; returns the applied factors."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = GradGuard(torch.optim.SGD([w], lr=0.0), max_norm=max_norm, spike=policy)
    coefs = []
    for n in seq:
        w.grad = torch.tensor([n, 0.0, 0.0, 0.0])
        opt.step()
        coefs.append(float(opt.last.clip_coef))
    return coefs, opt


def _zscore_reference(seq, z, alpha, warmup):
    """ZClip as described: exact mean/var over the warm-up, then EMAs updated with the clipped norm."""
    mean = var = 0.0
    n = 0
    limits = []
    for x in seq:
        if math.isnan(x):
            limits.append(None)
            continue
        limit = mean + z * math.sqrt(var) if n >= warmup else math.inf
        limits.append(limit)
        c = min(x, limit)
        if n < warmup:
            new_mean = mean + (c - mean) / (n + 1)
            var = var + ((c - mean) * (c - new_mean) - var) / (n + 1)
        else:
            new_mean = alpha * mean + (1 - alpha) * c
            var = alpha * var + (1 - alpha) * (c - new_mean) ** 2
        mean = new_mean
        n += 1
    return limits


def test_zscore_clip_follows_the_reference():
    seq = _norm_sequence()
    coefs, opt = _drive(gradguard.ZScoreClip(z=2.5, alpha=0.97, warmup=25), seq)
    limits = _zscore_reference(seq, 2.5, 0.97, 25)
    for i, (x, c, lim) in enumerate(zip(seq, coefs, limits)):
        if math.isnan(x):
            assert c == 1.0
            continue
        expected = lim / (x + 1e-6) if x > lim else 1.0
        assert c == pytest.approx(expected, rel=1e-5), i
    assert coefs[30] < 0.2 and coefs[35] < 0.3      # both spikes clipped to mean + 2.5 std
    assert sum(c < 1.0 for c in coefs) == 2          # and nothing else
    assert all(c == 1.0 for c in coefs[:25])         # never during warm-up
    assert opt.summary()["clipped"] == 2 and opt.summary()["skipped"] == 1


def test_percentile_clip_follows_the_reference():
    seq = _norm_sequence()
    q, window, warmup = 0.9, 16, 10
    coefs, _ = _drive(gradguard.PercentileClip(q=q, window=window, warmup=warmup), seq)
    seen = []
    for i, (x, c) in enumerate(zip(seq, coefs)):
        if math.isnan(x):
            assert c == 1.0
            continue
        if len(seen) >= warmup:
            limit = float(np.quantile(np.array(seen[-window:]), q))
            assert c == pytest.approx(limit / (x + 1e-6) if x > limit else 1.0, rel=1e-6), i
        else:
            assert c == 1.0, i
        seen.append(x)  # raw norms, spikes included (AutoClip)
    assert coefs[30] < 0.2


def test_spike_limit_combines_with_max_norm():
    seq = [1.0] * 10 + [5.0]
    coefs, _ = _drive(gradguard.ZScoreClip(z=2.0, warmup=5), seq)
    # Constant norms (std 0): a norm equal to the mean is not a spike; 5 is, and goes to the mean.
    assert coefs[:10] == [1.0] * 10 and coefs[10] == pytest.approx(1.0 / (5.0 + 1e-6))
    coefs, _ = _drive(gradguard.ZScoreClip(z=2.0, warmup=5), seq, max_norm=3.0)
    assert coefs[:10] == [1.0] * 10 and coefs[10] == pytest.approx(1.0 / (5.0 + 1e-6))
    coefs, _ = _drive(gradguard.ZScoreClip(z=2.0, warmup=5), seq, max_norm=0.5)
    assert coefs[0] == pytest.approx(0.5 / (1.0 + 1e-6)) and coefs[10] == pytest.approx(0.5 / (5.0 + 1e-6))


@pytest.mark.parametrize("kwargs,match", [
    (dict(z=0.0), "`z`"), (dict(z=float("nan")), "`z`"), (dict(alpha=1.0), "`alpha`"),
    (dict(alpha=0.0), "`alpha`"), (dict(warmup=0), "`warmup`"), (dict(warmup=2.5), "`warmup`"),
])
def test_zscore_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradguard.ZScoreClip(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=0.0), "`q`"), (dict(q=1.5), "`q`"), (dict(window=0), "`window`"), (dict(warmup=True), "`warmup`"),
    # a window of 2**40 was accepted, and the first step failed in the allocator (8 TB)
    (dict(window=2 ** 40), r"`window` must be an int in \[1, 100000\]"), (dict(window=100_001), "`window`"),
])
def test_percentile_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradguard.PercentileClip(**kwargs)


def _stepped(policy):
    w = torch.nn.Parameter(torch.ones(4))
    opt = gradguard.GradGuard(torch.optim.SGD([w], lr=0.1), spike=policy)
    w.grad = torch.ones(4)
    opt.step()
    return policy


@pytest.mark.parametrize("policy,edit,match", [
    # Loaded as they were: a window of 2**40 failed at the next step, in the allocator, and a
    # window that disagreed with its saved norms ranked slots that did not exist.
    (gradguard.PercentileClip(window=8), {"window": 2 ** 40}, r"`window` must be an int in \[1, 100000\]"),
    (gradguard.PercentileClip(window=8), {"window": 16}, "holds 8 norms but its `window` is 16"),
    (gradguard.PercentileClip(window=8), {"q": 2.0}, "`q`"),
    (gradguard.ZScoreClip(), {"alpha": 1.0}, "`alpha`"),
    (gradguard.ZScoreClip(), {"warmup": 0}, "`warmup`"),
], ids=["window-huge", "window-mismatch", "q", "alpha", "warmup"])
def test_load_state_dict_checks_what_the_constructor_checks(policy, edit, match):
    sd = {**_stepped(policy).state_dict(), **edit}
    fresh = type(policy)()
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)
    assert fresh.state_dict() == before  # refused before anything was changed


def test_load_state_dict_round_trip_still_works():
    for policy in (gradguard.PercentileClip(window=8), gradguard.ZScoreClip()):
        sd = _stepped(policy).state_dict()
        fresh = type(policy)()
        fresh.load_state_dict(sd)
        assert fresh.args == policy.args
        torch.testing.assert_close(fresh._state, policy._state, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("make", [lambda: gradguard.ZScoreClip(warmup=1), lambda: gradguard.PercentileClip(warmup=1)],
                         ids=["zscore", "percentile"])
def test_a_step_with_no_gradient_at_all_is_not_absorbed(make, device):
    # A zero first norm with warm-up 1 made the z-score limit 0 for good (every later step was
    # clipped to 0, and the clipped 0 absorbed again); a percentile window took the 0 in too.
    w = torch.nn.Parameter(torch.ones(4, device=device))
    policy = make()
    opt = gradguard.GradGuard(torch.optim.SGD([w], lr=0.1), spike=policy)
    w.grad = torch.zeros(4, device=device)
    opt.step()
    torch.testing.assert_close(policy._state, policy._initial_state(device), rtol=0, atol=0, equal_nan=True)
    w.grad = torch.full((4,), 0.5, device=device)  # norm 1
    opt.step()
    assert float(opt.last.clip_coef) == 1.0
    if policy.kind == "zscore":
        assert policy._state.tolist() == [1.0, 0.0, 1.0]  # mean 1, var 0, one step absorbed
    else:
        assert policy._state[0].item() == 1.0 and 1.0 in policy._state[1:].tolist()
    w.grad = torch.full((4,), 0.25, device=device)  # norm 0.5: under the limit, not clipped to 0
    opt.step()
    assert float(opt.last.clip_coef) == 1.0


@pytest.mark.parametrize("first", [False, True])
def test_a_norm_whose_square_overflows_is_not_absorbed(device, first):
    # float64 gradients with a finite norm of 1e160 in the warm-up: the Welford term overflowed,
    # the variance went inf, then NaN, and the policy never clipped again (a 1e6 spike got 1.0).
    # As the first norm it was absorbed as the mean, and every later deviation overflowed.
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64, device=device))
    policy = gradguard.ZScoreClip(warmup=5)
    opt = gradguard.GradGuard(torch.optim.SGD([w], lr=0.0), spike=policy)
    for v in ([1e160, 1.0] if first else [1.0, 1e160]) + [1.0] * 20 + [1e6]:
        w.grad = torch.tensor([v, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        opt.step()
    mean, var, count = policy._state.tolist()
    assert (mean, var, count) == (1.0, 0.0, 22.0)  # the 1e160 step left them alone (21 ones, the clipped spike)
    assert float(opt.last.clip_coef) == pytest.approx(1.0 / 1e6, rel=1e-9)  # the spike is clipped to the mean


@pytest.mark.parametrize("make", [lambda: gradguard.ZScoreClip(warmup=3), lambda: gradguard.PercentileClip(warmup=3)],
                         ids=["zscore", "percentile"])
def test_an_lbfgs_step_rolled_back_leaves_the_policy_as_it_was(make):
    # The decision absorbed the first evaluation's norm; a later evaluation's NaN rolled the step
    # back as a skipped non-finite one, which a policy never sees, but its statistics kept it.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    policy = make()
    opt = gradguard.GradGuard(torch.optim.LBFGS([p], lr=0.1, max_iter=3), spike=policy)
    calls = {"n": 0, "bad": False}

    def closure():
        opt.zero_grad()
        calls["n"] += 1
        loss = (p ** 2).sum()
        loss.backward()
        if calls["bad"] and calls["n"] == 2:  # the second evaluation inside the step goes NaN
            p.grad.fill_(math.nan)
        return loss

    for step in range(3):
        calls["n"], calls["bad"] = 0, step == 2
        before = policy._state.clone() if policy._state is not None else None
        opt.step(closure)
    assert bool(opt.last.skipped) and bool(opt.last.found_inf)
    torch.testing.assert_close(policy._state, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cls,name,bad", [
    (gradguard.ZScoreClip, "z", -1.0), (gradguard.ZScoreClip, "z", float("nan")), (gradguard.ZScoreClip, "alpha", 2.0),
    (gradguard.ZScoreClip, "warmup", 0), (gradguard.PercentileClip, "q", 1.5), (gradguard.PercentileClip, "window", 0),
    (gradguard.PercentileClip, "warmup", 1.5)])
def test_a_policy_setting_assigned_later_is_checked_as_at_construction(cls, name, bad):
    # They were plain attributes: z = -1 or alpha = 2 went into the decision without a word.
    pol = cls(warmup=2)
    before = getattr(pol, name)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        setattr(pol, name, bad)
    assert getattr(pol, name) == before


def test_percentile_window_changes_only_before_the_policy_holds_norms():
    # A changed window with the old state made every later step fail inside guard_decide
    # ("`spike_state` of 'percentile' must have shape [11]").
    pol = gradguard.PercentileClip(window=8, warmup=2)
    pol.window = 16
    p = torch.nn.Parameter(torch.ones(3))
    g = gradguard.GradGuard(torch.optim.SGD([p], lr=0.1), spike=pol)
    p.grad = torch.ones(3)
    g.step()
    pol.window = 16  # the same value: fine
    with pytest.raises(ValueError, match="cannot change from 16 to 4 once it holds norms"):
        pol.window = 4
    p.grad = torch.ones(3)
    g.step()
    assert g.summary()["steps"] == 2 and pol.state_tensor(torch.device("cpu")).numel() == 17


def test_a_policy_pickled_with_its_settings_as_attributes_loads():
    pol = gradguard.PercentileClip(q=0.5, window=8, warmup=3)
    state = pol.__getstate__()
    for name in ("q", "window", "warmup"):
        state[name] = state.pop("_" + name)  # as pickled before they were checked settings
    clone = gradguard.PercentileClip.__new__(gradguard.PercentileClip)
    clone.__setstate__(state)
    assert (clone.q, clone.window, clone.warmup) == (0.5, 8, 3) and "q" not in vars(clone)
    assert repr(copy.deepcopy(gradguard.ZScoreClip(z=3.0))) == "ZScoreClip(z=3.0, alpha=0.97, warmup=25)"

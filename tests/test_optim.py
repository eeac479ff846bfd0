"""GradGuard core: what a step does with finite and non-finite gradients, on every optimizer path."""
from __future__ import annotations

import copy

import math
import warnings

import pytest
import torch

import gradguard
from gradguard import GradGuard, NonFiniteGradError, fused_adam
from gradguard import optim as optim_mod
from optim_util import (OPTIMIZERS, TinyNet, assert_bit_identical, decide_on, make_grads,  # noqa: F401
                        make_params, poison, set_grads, snapshot)


def test_is_an_optimizer_sharing_groups_and_state():
    params = make_params()
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = GradGuard(inner, max_norm=1.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    set_grads(params, make_grads(0))
    opt.step()
    assert len(inner.state) == len(params) and opt.state is inner.state
    # The inner load_state_dict replaces its containers: the guard must follow.
    inner.load_state_dict(inner.state_dict())
    assert opt.state is inner.state and opt.param_groups is inner.param_groups


@pytest.mark.parametrize("first", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skipped_step_is_bit_identical(name, first, decide_on):
    params = make_params()
    opt = GradGuard(OPTIMIZERS[name](params), max_norm=1.0)
    ref_params = make_params()
    ref = OPTIMIZERS[name](ref_params)
    good_steps = 0 if first else 2
    for i in range(good_steps):
        set_grads(params, make_grads(i))
        opt.step()
        # Same clipping by hand for the reference run.
        set_grads(ref_params, make_grads(i))
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()

    bad = poison(make_grads(99))
    set_grads(params, bad)
    before = snapshot(params, opt)
    opt.step()
    # Parameters and optimizer state, also on a skipped first step decided on the device (fused
    # Adam/AdamW used to create their state there, before the kernel saw found_inf).
    assert_bit_identical(before, snapshot(params, opt))
    assert bool(opt.last.skipped) and bool(opt.last.found_inf)
    # The gradients are left as they were, for inspection.
    for g, p in zip(bad, params):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)

    # Afterwards the run continues exactly as if the bad step had never happened.
    for i in range(good_steps, good_steps + 3):
        set_grads(params, make_grads(i))
        opt.step()
        set_grads(ref_params, make_grads(i))
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.summary()["skipped"] == 1


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_foreach", "adamw_fused", "sgd_momentum_fused", "adam"])
def test_skip_without_clipping_matches_unguarded_run_bitwise(name, decide_on):
    params, ref_params = make_params(), make_params()
    opt, ref = GradGuard(OPTIMIZERS[name](params)), OPTIMIZERS[name](ref_params)
    for i in range(5):
        set_grads(params, poison(make_grads(i)) if i == 2 else make_grads(i))
        opt.step()
        if i != 2:
            set_grads(ref_params, make_grads(i))
            ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    assert opt.history.as_dict()["skipped"] == [False, False, True, False, False]


def test_fused_sgd_first_step_trap_is_avoided():
    # Skipping fused SGD's first step through found_inf leaves uninitialised momentum (a PyTorch
    # behaviour); the guard must not go that way.
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))
    set_grads(params, poison(make_grads(0)))
    opt.step()
    assert len(opt.optimizer.state) == 0 or all("momentum_buffer" not in s for s in opt.optimizer.state.values())
    for i in range(1, 4):
        set_grads(params, make_grads(i))
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", ["adamw_fused"])  # fused SGD: torch itself refuses a parameter that joins late
def test_a_parameter_whose_first_gradient_comes_on_a_skipped_step_gets_no_state(name, decide_on):
    # An expert that got no tokens until a step that is skipped: fused AdamW created its state
    # there, on the device-decided path (the state check had stopped once the others had theirs).
    params = make_params()
    opt = GradGuard(OPTIMIZERS[name](params), max_norm=1.0)
    for i in range(2):
        set_grads(params, [None if k == 1 else g for k, g in enumerate(make_grads(i))])
        opt.step()
    assert params[1] not in opt.optimizer.state
    # Only the parameter still without state is looked at per step (the whole list took ~19 us).
    assert opt._fused_missing == ([params[1]], []) and not opt._fused_state_ready
    set_grads(params, poison(make_grads(2)))
    before = snapshot(params, opt)
    opt.step()
    assert bool(opt.last.skipped) and params[1] not in opt.optimizer.state
    assert_bit_identical(before, snapshot(params, opt))
    set_grads(params, make_grads(3))
    opt.step()
    assert not bool(opt.last.skipped) and params[1] in opt.optimizer.state
    opt._fused_ready()
    assert opt._fused_missing == ([], []) and opt._fused_state_ready


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_foreach", "adamw_fused", "sgd_momentum_fused", "rmsprop"])
def test_matches_torch_clip_grad_norm_then_step(name, norm_type, decide_on):
    params, ref_params = make_params(), make_params()
    opt, ref = GradGuard(OPTIMIZERS[name](params), max_norm=2.0, norm_type=norm_type), OPTIMIZERS[name](ref_params)
    clipped = expected = 0
    for i in range(6):
        grads = make_grads(i, scale=0.05 if i % 2 else 3.0)  # alternately under and over the limit
        set_grads(params, grads)
        fused_adam._local.last = None
        opt.step()
        took = fused_adam.last_step()
        set_grads(ref_params, grads)
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 2.0, norm_type=norm_type)
        ref.step()
        torch.testing.assert_close(opt.last.total_norm, norm, rtol=1e-6, atol=0)
        # The grads are clipped in place too, except where a fused Adam/AdamW on the CPU clipped inside
        # its update (gradguard.fused_adam): there .grad keeps the gradient backward gave.
        untouched = took is not None and took["taken"] > 0
        if name == "adamw_fused" and fused_adam._kernel_ready() and i > 0 and float(norm) > 2.0:
            assert untouched  # every clipping step after the first (no state yet: decided on the host)
        for g, q, given in zip([p.grad for p in params], ref_params, grads):
            torch.testing.assert_close(g, given if untouched else q.grad, rtol=0 if untouched else 1e-6,
                                       atol=0 if untouched else 1e-7)
        clipped += float(opt.last.clip_coef) < 1.0
        expected += float(norm) > 2.0
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert clipped == expected >= 3 and opt.summary()["clipped"] == expected


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused", "adamw_foreach"])
def test_zero_mode_zeroes_nonfinite_and_clips_by_the_rest(name, decide_on):
    params, ref_params = make_params(), make_params()
    opt, ref = GradGuard(OPTIMIZERS[name](params), max_norm=1.0, on_nonfinite="zero"), OPTIMIZERS[name](ref_params)
    bad = poison(make_grads(0))
    set_grads(params, bad)
    opt.step()
    cleaned = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in bad]
    set_grads(ref_params, cleaned)
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not bool(opt.last.skipped) and bool(opt.last.found_inf)
    assert set(opt.last.nonfinite_layers) == {"param[0]", "param[2]"}


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_raise_mode_raises_with_the_report_and_does_not_step(name, decide_on):
    model = TinyNet()
    opt = GradGuard(OPTIMIZERS[name](model.parameters()), on_nonfinite="raise", model=model)
    model(torch.randn(4, 8)).sum().backward()
    model.fc2.weight.grad[0, 3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradError, match=r"fc2\.weight \(1 NaN, 0 Inf\)") as info:
        opt.step()
    assert info.value.names == ["fc2.weight"]
    assert info.value.report is opt.last and info.value.report.nonfinite_layers == ["fc2.weight"]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.summary()["skipped"] == 1


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused", "adamw_foreach"])
def test_ignore_mode_steps_as_if_unguarded(name, decide_on):
    params, ref_params = make_params(), make_params()
    opt, ref = GradGuard(OPTIMIZERS[name](params), max_norm=1.0, on_nonfinite="ignore"), OPTIMIZERS[name](ref_params)
    bad = poison(make_grads(0))
    set_grads(params, bad)
    opt.step()
    set_grads(ref_params, bad)
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
    assert not bool(opt.last.skipped) and opt.last.nonfinite_layers == ["param[0]", "param[2]"]
    assert not all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_max_consecutive_skips(name, decide_on):
    params = make_params()
    opt = GradGuard(OPTIMIZERS[name](params), max_consecutive_skips=3)
    pattern = [1, 1, 0, 1, 1]  # a good step in between resets the streak
    for i, bad in enumerate(pattern):
        set_grads(params, poison(make_grads(i)) if bad else make_grads(i))
        opt.step()
    assert opt.summary()["consecutive_skips"] == 2
    set_grads(params, poison(make_grads(9)))
    before = snapshot(params, opt)
    with pytest.raises(NonFiniteGradError, match="3 steps in a row were skipped") as info:
        opt.step()
    assert_bit_identical(before, snapshot(params, opt))
    assert info.value.report is opt.last and info.value.names == ["param[0]", "param[2]"]
    assert opt.summary()["skipped"] == 5


def test_max_consecutive_skips_of_one_says_one_step():
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1), max_consecutive_skips=1)
    set_grads(params, poison(make_grads(0)))
    with pytest.raises(NonFiniteGradError, match=r"GradGuard: 1 step was skipped \(max_consecutive_skips=1\)"):
        opt.step()


def test_closure_is_evaluated_once_and_its_loss_returned():
    model = TinyNet()
    opt = GradGuard(torch.optim.Adam(model.parameters(), lr=1e-2), max_norm=1.0)
    x, calls = torch.randn(8, 8), []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.isfinite(loss) and opt.last is not None


def test_lbfgs_closure_reevaluations_work():
    target = torch.tensor([3.0, -2.0])
    w = torch.nn.Parameter(torch.zeros(2))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1.0, max_iter=20))

    def closure():
        opt.zero_grad()
        loss = (w - target).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), target, rtol=0, atol=1e-4)


def test_add_param_group_and_params_without_grad():
    a, b = make_params(0, [(3, 3)])[0], make_params(1, [(4,)])[0]
    opt = GradGuard(torch.optim.SGD([a], lr=0.1), max_norm=1.0, names=["a"])
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2
    b.grad = torch.ones(4)          # a has no grad this step
    opt.step()
    assert opt.last.names == ["param[1]"]
    torch.testing.assert_close(b.detach(), make_params(1, [(4,)])[0].detach() - 0.01 * 0.5, rtol=0, atol=1e-6)
    a.grad = torch.full((3, 3), float("nan"))
    b.grad = torch.ones(4)
    opt.step()
    assert opt.last.nonfinite_layers == ["a"] and bool(opt.last.skipped)
    assert opt.summary()["worst_layers"][0] == {"name": "a", "nonfinite_steps": 1, "max_norm": 0.0}


def test_fused_path_never_reads_the_device(monkeypatch):
    params = make_params()
    opt = GradGuard(torch.optim.AdamW(params, lr=1e-2, fused=True), max_norm=1.0, spike=gradguard.ZScoreClip(warmup=2))
    set_grads(params, make_grads(0))
    opt.step()  # first step: lazily created state
    monkeypatch.setattr(GradGuard, "_decide_on_host_on_cpu", False)  # the accelerator path

    def no_sync(*args, **kwargs):
        raise AssertionError("host read in the fused path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for i in range(1, 4):
        set_grads(params, poison(make_grads(i)) if i == 2 else make_grads(i))
        opt.step()
    monkeypatch.undo()
    assert opt.history.as_dict()["skipped"] == [False, False, True, False]


def test_zero_grad_delegates():
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1))
    set_grads(params, make_grads(0))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    set_grads(params, make_grads(0))
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


BAD_INPUT = [
    (dict(optimizer=torch.nn.Linear(2, 2)), TypeError, "`optimizer` must be a torch.optim.Optimizer, got Linear"),
    (dict(max_norm=-1.0), ValueError, "`max_norm` must be a non-negative number"),
    (dict(max_norm=float("nan")), ValueError, "`max_norm`"),
    (dict(max_norm="1"), ValueError, "`max_norm`"),
    (dict(norm_type=0), ValueError, "`norm_type`"),
    (dict(on_nonfinite="drop"), ValueError, r"`on_nonfinite` must be one of \('skip', 'zero', 'raise', 'ignore'\)"),
    (dict(max_consecutive_skips=0), ValueError, "`max_consecutive_skips`"),
    (dict(max_consecutive_skips=True), ValueError, "`max_consecutive_skips`"),
    (dict(spike=0.9), TypeError, "`spike` must be None or a spike policy"),
    (dict(model="net"), TypeError, "`model` must be an nn.Module"),
    (dict(names=["only_one"]), ValueError, "`names` has 1 entries but the optimizer holds 3 parameters"),
    (dict(names=3), TypeError, "`names` must be a list of str"),
    (dict(names=["x", "x", "y"]), ValueError, r"`names` holds 'x' twice \(entry 1\)"),
    (dict(history_size=0), ValueError, "`history_size`"),
    (dict(process_group=1), TypeError, "`process_group` must be None or a torch.distributed.ProcessGroup"),
]


@pytest.mark.parametrize("call", ["grad_stats", "all_finite", "clip_grad_norm_"])
def test_a_process_group_that_is_not_one_is_refused_by_the_stats_functions(call):
    # It failed at the collective, as a bare KeyError from torch.
    t = torch.ones(3, requires_grad=True)
    t.grad = torch.ones(3)
    fn = getattr(gradguard, call)
    args = ([t], 1.0) if call == "clip_grad_norm_" else ([t.grad],)
    with pytest.raises(TypeError, match="`process_group` must be None or a torch.distributed.ProcessGroup"):
        fn(*args, process_group="pg")


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUT, ids=[next(iter(k)) + "=" + repr(v)[:20] for k, v, _ in
                                                          [(k, next(iter(k.values())), m) for k, _, m in BAD_INPUT]])
def test_bad_input_fails_at_construction(kwargs, exc, match):
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(make_params(), lr=0.1)
    with pytest.raises(exc, match=match):
        GradGuard(optimizer, **kwargs)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", torch.tensor(-1.0), torch.tensor(float("nan"))],
                         ids=["negative", "nan", "str", "negative-tensor", "nan-tensor"])
def test_a_max_norm_assigned_later_is_checked_as_at_construction(bad):
    # max_norm was a plain attribute (a clipping schedule assigns it): a NaN number wrote NaN into
    # every parameter, a negative one reversed the update's sign.
    p = torch.nn.Parameter(torch.zeros(2))
    opt = GradGuard(torch.optim.SGD([p], lr=1.0), max_norm=1.0)
    with pytest.raises(ValueError, match="`max_norm`"):
        opt.max_norm = bad
    assert opt.max_norm == 1.0
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))  # clipped to 1.0, as before
    opt.max_norm = 2  # an integer is taken as a float, as at construction
    assert type(opt.max_norm) is float and opt.max_norm == 2.0
    opt.max_norm = None
    assert opt.max_norm is None


@pytest.mark.parametrize("name,bad,match", [
    ("max_consecutive_skips", 0, "`max_consecutive_skips`"), ("max_consecutive_skips", -1, "`max_consecutive_skips`"),
    ("max_consecutive_skips", 1.5, "`max_consecutive_skips`"), ("norm_type", 0, "`norm_type`"),
    ("norm_type", float("nan"), "`norm_type`"), ("on_nonfinite", "drop", "`on_nonfinite`"),
    ("on_nonfinite", None, "`on_nonfinite`")])
def test_the_other_settings_assigned_later_are_checked_as_at_construction(name, bad, match):
    # They were plain attributes: max_consecutive_skips = 0 made every finite step (stepped) then
    # raise "0 steps in a row were skipped".
    p = torch.nn.Parameter(torch.zeros(2))
    opt = GradGuard(torch.optim.SGD([p], lr=1.0), max_norm=1.0, max_consecutive_skips=2)
    before = getattr(opt, name)
    with pytest.raises((ValueError, TypeError), match=match):
        setattr(opt, name, bad)
    assert getattr(opt, name) == before
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()  # a finite step: taken, no error
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))
    opt.max_consecutive_skips, opt.norm_type, opt.on_nonfinite = None, 1, "zero"
    assert (opt.max_consecutive_skips, opt.norm_type, opt.on_nonfinite) == (None, 1.0, "zero")
    assert type(opt.norm_type) is float


def test_a_model_assigned_later_names_the_layers_from_then_on():
    # The names found without it were cached: every report and error kept naming param[i],
    # while summary() named the layers.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="raise")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.last.names[0] == "param[0]"
    opt.model = model
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    model[1].weight.grad[0, 0] = math.nan
    with pytest.raises(NonFiniteGradError, match=r"1\.weight \(1 NaN"):
        opt.step()
    assert opt.last.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        opt.model = "model"
    assert opt.model is model


def test_a_spike_policy_assigned_later_is_checked_and_owned_as_at_construction():
    # Assigned, a policy was neither type-checked (a float failed at the next step, inside it)
    # nor owned: a second guard then took the same policy, and each was clipped by the other's norms.
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    a = GradGuard(torch.optim.SGD([p], lr=0.1))
    b = GradGuard(torch.optim.SGD([q], lr=0.1))
    with pytest.raises(TypeError, match="`spike` must be None or a spike policy"):
        a.spike = 3.0
    pol = gradguard.ZScoreClip(warmup=2)
    a.spike = pol
    with pytest.raises(ValueError, match="belongs to another GradGuard"):
        b.spike = pol
    with pytest.raises(ValueError, match="belongs to another GradGuard"):
        GradGuard(torch.optim.SGD([q], lr=0.1), spike=pol)
    a.spike = pol  # the same guard again: fine
    a.spike = gradguard.ZScoreClip()  # replaced: the old one is free again
    b.spike = pol
    assert b.spike is pol and a.spike is not pol


def test_hygiene_and_tracer_assigned_later_are_checked():
    opt = GradGuard(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    with pytest.raises(TypeError, match="`hygiene` must be True or False"):
        opt.hygiene = "off"  # truthy: it left the checks on
    assert opt.hygiene is True
    opt.hygiene = False
    assert opt.hygiene is False
    with pytest.raises(TypeError, match="`tracer` must be a gradguard.NanTracer"):
        opt.tracer = "tracer"
    assert opt.tracer is None


def test_a_guard_pickled_with_its_bindings_as_attributes_loads():
    model = torch.nn.Linear(2, 1)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, spike=gradguard.ZScoreClip(),
                    hygiene=False)
    state = opt.__getstate__()
    limits = state["_limits"]
    for name in ("hygiene", "tracer", "spike", "model", "process_group"):
        state[name] = limits.pop(name)
    clone = GradGuard.__new__(GradGuard)
    clone.__setstate__(state)
    assert clone.model is model and clone.process_group is None and clone.hygiene is False
    assert clone.spike is state["spike"] and clone.spike._guard() is clone


def test_guards_pickled_by_older_versions_load_and_step():
    # max_norm was `_max_norm` for a while (loaded as None: clipping silently off), and older
    # pickles lack the plan, FSDP1's groups and ZeRO's group (AttributeError at the first step).
    model = torch.nn.Linear(2, 1)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5, model=model)
    state = opt.__getstate__()
    limits = state.pop("_limits")
    state["_max_norm"] = limits["max_norm"]
    state.update({k: v for k, v in limits.items() if k != "max_norm"})
    for name in ("_plan", "_fsdp_group", "_fsdp_whole", "_decide_group", "_name_list", "_layout_cache"):
        state.pop(name)
    clone = GradGuard.__new__(GradGuard)
    clone.__setstate__(state)
    assert clone.max_norm == 0.5 and "_max_norm" not in vars(clone)
    model.weight.grad = torch.full((1, 2), 30.0)
    model.bias.grad = torch.full((1,), 40.0)
    clone.step()
    assert float(clone.last.clip_coef) == pytest.approx(0.5 / math.sqrt(2 * 900 + 1600), rel=1e-6)


def test_a_guard_pickled_with_its_settings_as_attributes_loads():
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1), norm_type=1.0, on_nonfinite="zero",
                    max_consecutive_skips=3)
    state = opt.__getstate__()
    limits = state.pop("_limits")
    state.update(max_norm=limits["max_norm"], norm_type=1.0, on_nonfinite="zero", max_consecutive_skips=3)
    clone = GradGuard.__new__(GradGuard)
    clone.__setstate__(state)
    assert (clone.norm_type, clone.on_nonfinite, clone.max_consecutive_skips) == (1.0, "zero", 3)
    assert not {"norm_type", "on_nonfinite", "max_consecutive_skips"} & set(vars(clone))


def test_a_guard_pickled_with_max_norm_as_an_attribute_loads():
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1), max_norm=0.5)
    state = opt.__getstate__()
    state["max_norm"] = state.pop("_limits")["max_norm"]  # as pickled before max_norm was a property
    clone = GradGuard.__new__(GradGuard)
    clone.__setstate__(state)
    assert clone.max_norm == 0.5 and "max_norm" not in vars(clone)
    clone.max_norm = 0.25  # its own limit, not the original's
    assert (clone.max_norm, opt.max_norm) == (0.25, 0.5)
    import copy

    shallow = copy.copy(opt)  # a copy too, though its dict of limits would be shared without care
    shallow.max_norm = 0.125
    assert (shallow.max_norm, opt.max_norm) == (0.125, 0.5)


def test_an_lbfgs_step_without_a_closure_is_refused_before_anything_is_recorded():
    # LBFGS itself refuses it at once; through the guard the step was counted and .grad clipped
    # first, then LBFGS failed on "'NoneType' object is not callable", at every retry.
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = GradGuard(torch.optim.LBFGS([w], lr=0.1), max_norm=1.0)
    w.grad = torch.tensor([3.0, 4.0])
    for _ in range(2):
        with pytest.raises(TypeError, match="LBFGS needs `closure`"):
            opt.step()
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0])) and opt.summary()["steps"] == 0 and opt.last is None


def test_meta_gradients_are_refused_before_the_guard_makes_state_there():
    # A dry run on a meta model: torch's bare "Cannot copy out of meta tensor" came from inside
    # the step, after the guard's counters and history were made on the meta device, so that
    # summary() and state_dict() failed from then on.
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, model=model)
    model(torch.randn(2, 3, device="meta")).sum().backward()
    with pytest.raises(ValueError, match="the gradient of 'weight' is on the meta device"):
        opt.step()
    assert opt.summary()["steps"] == 0
    opt.state_dict()


def test_wrapping_twice_is_refused():
    opt = GradGuard(torch.optim.SGD(make_params(), lr=0.1))
    with pytest.raises(TypeError, match="already a GradGuard"):
        GradGuard(opt)


def test_complex_params_are_refused_at_construction():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"parameter 'w' is complex"):
        GradGuard(torch.optim.SGD([p], lr=0.1), names=["w"])


def test_a_model_converted_to_complex_after_construction_is_refused_untouched():
    # The README: parameters converted in place are picked up at the next step. Converted to
    # complex, the fallback's stats op read only the real parts: a NaN in an imaginary part went
    # unseen and the step wrote it into the weight.
    model = torch.nn.Linear(2, 1, bias=False)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, model=model)
    model.to(torch.cfloat)
    model.weight.grad = torch.tensor([[3 + 4j, complex(0, math.nan)]], dtype=torch.cfloat)
    before = model.weight.detach().clone()
    with pytest.raises(TypeError, match=r"parameter 'weight' is complex"):
        opt.step()
    assert torch.equal(model.weight.detach(), before)


def test_stats_op_refuses_complex_on_every_kernel():
    z = torch.tensor([3 + 4j, complex(0, math.nan)], dtype=torch.cfloat)
    with pytest.raises(NotImplementedError, match=r"dtype (torch.complex64|ComplexFloat) is not supported"):
        torch.ops.gradguard.multi_tensor_stats([z], 2.0)
    from gradguard.reference import stats as reference
    with pytest.raises(NotImplementedError, match=r"dtype torch.complex64 is not supported"):
        reference.multi_tensor_stats([z], 2.0)


def test_add_param_group_refuses_a_complex_parameter_before_adding_it():
    w = torch.nn.Parameter(torch.randn(3))
    opt = GradGuard(torch.optim.SGD([w], lr=0.1))
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    with pytest.raises(TypeError, match=r"is complex"):
        opt.add_param_group({"params": (q for q in [z])})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [w]
    w.grad = torch.ones(3)
    opt.step()  # still steps: the refused parameter is not in the optimizer
    assert torch.equal(w.detach(), opt.param_groups[0]["params"][0].detach())
    v = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": (q for q in [v]), "lr": 1.0})  # a generator is read once, as torch reads it
    assert opt.param_groups[1]["params"] == [v]


def test_a_skipped_step_after_the_fused_state_was_cleared_creates_none(decide_on):
    # opt.state.clear() (resetting Adam's moments) after the state had been complete: the guard
    # still took it for complete, and on the device-decided path the skipped step called the fused
    # step, which made fresh state before it saw found_inf.
    w = torch.nn.Parameter(torch.randn(3))
    opt = GradGuard(torch.optim.AdamW([w], lr=1e-2, fused=True), hygiene=False)
    for _ in range(2):
        w.grad = torch.randn(3)
        opt.step()
    for reset in ("clear", "replace"):
        if reset == "clear":
            opt.state.clear()
        else:
            opt.optimizer.state = type(opt.optimizer.state)(dict)
        w.grad = torch.full((3,), math.nan)
        before = w.detach().clone()
        opt.step()
        assert bool(opt.last.skipped) and len(opt.optimizer.state) == 0 and torch.equal(w.detach(), before)
        w.grad = torch.randn(3)
        opt.step()  # a good step makes the state again
        assert set(opt.optimizer.state[w]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("unused", [False, True], ids=["state_complete", "unused_trainable"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_skipped_step_creates_no_state_for_a_parameter_unfrozen_later(decide_on, amsgrad, unused):
    # Gradual unfreezing: a frozen parameter (requires_grad=False) is not waited for, so the state
    # counted as complete without it; unfrozen later, its first gradient came on a step to skip,
    # and on the device-decided path the fused step made its state before it saw found_inf.
    # `unused`: a trainable parameter that never gets a gradient (an unused head) keeps the state
    # incomplete; the frozen one was dropped from the parameters still looked at then.
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    head = [torch.nn.Parameter(torch.randn(4))] if unused else []
    opt = GradGuard(torch.optim.AdamW([a, b] + head, lr=0.1, fused=True, amsgrad=amsgrad), hygiene=False)
    for _ in range(2):
        a.grad = torch.ones(4)
        opt.step()
    b.requires_grad_(True)
    a.grad, b.grad = torch.ones(4), torch.full((4,), math.nan)
    before = [q.detach().clone() for q in (a, b)]
    opt.step()
    assert bool(opt.last.skipped) and b not in opt.optimizer.state
    assert all(torch.equal(q.detach(), x) for q, x in zip((a, b), before))
    b.grad = torch.ones(4)
    opt.step()  # its first good step makes its state
    assert not bool(opt.last.skipped) and "exp_avg" in opt.optimizer.state[b]


def _sparse_pair(optimizer):
    torch.manual_seed(0)
    a = torch.nn.Embedding(10, 4, sparse=True)
    b = copy.deepcopy(a)
    return a, b, optimizer(a.parameters()), optimizer(b.parameters())


@pytest.mark.parametrize("optimizer", [lambda ps: torch.optim.SGD(ps, lr=0.5),
                                       lambda ps: torch.optim.SparseAdam(list(ps), lr=0.1)], ids=["sgd", "sparse_adam"])
def test_sparse_grads_are_checked_and_clipped(optimizer):
    a, b, inner_a, ref = _sparse_pair(optimizer)
    opt = GradGuard(inner_a, max_norm=0.5, model=a)
    idx = torch.tensor([1, 2, 2, 7])  # a duplicate index: the grad is uncoalesced
    for m in (a, b):
        (m(idx) * torch.arange(16.0).view(4, 4)).sum().backward()
    assert not a.weight.grad.is_coalesced()
    dense = b.weight.grad.to_dense().double()
    total = dense.norm()
    torch.testing.assert_close(opt.last.total_norm.double() if opt.last else total, total)
    opt.step()
    torch.testing.assert_close(opt.last.total_norm.double(), total)
    coef = min(0.5 / (float(total) + 1e-6), 1.0)
    b.weight.grad = b.weight.grad * coef
    ref.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    assert float(opt.last.clip_coef) < 1.0


def test_sparse_nonfinite_grad_skips_the_step():
    a, _, inner, _ = _sparse_pair(lambda ps: torch.optim.SGD(ps, lr=0.5))
    opt = GradGuard(inner, model=a)
    a(torch.tensor([3])).sum().backward()
    a.weight.grad._values()[0, 1] = float("nan")
    before = a.weight.detach().clone()
    opt.step()
    assert bool(opt.last.skipped) and opt.last.nonfinite_layers == ["weight"]
    assert torch.equal(a.weight, before)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
                                  lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True)], ids=["sgd", "adamw", "adagrad"])
def test_fused_float64_steps_clip_in_float64(make, decide_on):
    """A fused kernel's grad_scale is float32: float64 grads divided by it were clipped to ~3e-8
    relative. They are clipped by the float64 multiplier instead, as clip_grad_norm_ does."""
    g = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(3, 1000, generator=g, dtype=torch.float64)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    guard, ref = GradGuard(make([p]), max_norm=1.0), make([q])
    for k in range(3):
        p.grad, q.grad = grads[k] * 10, grads[k] * 10
        guard.step()
        torch.nn.utils.clip_grad_norm_([q], 1.0)
        ref.step()
        assert float(guard.last.clip_coef) < 1.0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-15, atol=0)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-14, atol=1e-15)


def test_sparse_zero_mode_zeroes_every_duplicate_of_a_nonfinite_element():
    # Row 1 has two stored entries, NaN and 4.0: the coalesced element (what the optimizer sees)
    # is NaN, so "zero" must zero it whole, not only the stored NaN (which left 4.0 * coef).
    emb = torch.nn.Embedding(4, 1, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = GradGuard(torch.optim.SGD(emb.parameters(), lr=1.0), max_norm=1.0, on_nonfinite="zero")
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 2]]), torch.tensor([[float("nan")], [4.0], [3.0]]),
                                              (4, 1))
    opt.step()
    assert emb.weight.grad.is_coalesced()
    torch.testing.assert_close(opt.last.clip_coef.double(), torch.tensor(1.0 / (3.0 + 1e-6), dtype=torch.float64))
    update = (w0 - emb.weight.detach()).flatten()
    assert update[1] == 0 and update[0] == 0 and update[3] == 0
    torch.testing.assert_close(update[2], torch.tensor(3.0 / (3.0 + 1e-6)))


def test_lbfgs_checks_every_closure_evaluation():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1.0, max_iter=5), names=["w"])
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = (w ** 2).sum()
        if calls[0] == 2:  # the second evaluation, inside LBFGS.step()
            loss = loss * float("nan")
        loss.backward()
        return loss

    before = w.detach().clone()
    state_before = len(opt.optimizer.state)
    opt.step(closure)
    assert calls[0] == 2
    assert torch.equal(w.detach(), before)  # rolled back, not [nan, ...]
    assert len(opt.optimizer.state) == state_before
    assert bool(opt.last.skipped) and opt.summary()["skipped"] == 1
    assert opt.history.as_dict()["skipped"] == [True]
    # A clean closure afterwards steps normally.
    calls[0] = 10
    opt.step(closure)
    assert not bool(opt.last.skipped) and float(w.detach().abs().max()) < float(before.abs().max())


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_an_lbfgs_step_rolled_back_runs_the_step_hooks(mode):
    # In "raise" mode the rollback raised inside the LBFGS step, before the hooks: a logging hook
    # (add_step_hook: "after every step, also a skipped or raising one") never saw the bad step.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1.0, max_iter=5), on_nonfinite=mode, names=["w"])
    seen = []
    opt.add_step_hook(lambda guard, report: seen.append((report.step, bool(report.skipped))))
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = (w ** 2).sum()
        loss.backward()
        if calls[0] == 2:  # the second evaluation, inside LBFGS.step()
            w.grad[0] = float("nan")
        return loss

    before = w.detach().clone()
    if mode == "raise":
        with pytest.raises(NonFiniteGradError, match="the step was rolled back"):
            opt.step(closure)
    else:
        opt.step(closure)
    assert torch.equal(w.detach(), before)
    assert seen == [(1, True)] and opt.summary()["skipped"] == 1

    def failing(guard, report):
        raise RuntimeError("the hook failed")

    opt.add_step_hook(failing)
    calls[0] = 0
    if mode == "raise":  # the hook's error chained onto the guard's, as on every raising step
        with pytest.raises(NonFiniteGradError, match="the step was rolled back") as err:
            opt.step(closure)
        assert isinstance(err.value.__cause__, RuntimeError)
        assert seen[-1] == (2, True)


def test_an_lbfgs_agreement_that_is_refused_records_nothing(monkeypatch):
    # The ranks' group for the LBFGS checks was looked for after the decision had counted the
    # step: a model whose ranks no one group holds counted a step at every refused call.
    from gradguard import distributed

    def refuse(models, params):
        raise ValueError("no process group holds exactly them")

    monkeypatch.setattr(distributed, "agreement_group", refuse)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1.0, max_iter=3))

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="no process group"):
        opt.step(closure)
    assert opt.summary()["steps"] == 0 and opt.last is None and torch.equal(w.detach(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("mode", ["skip", "zero", "raise"])
def test_lbfgs_rolls_back_on_a_nonfinite_first_loss_with_finite_gradients(mode):
    # The first evaluation's loss was not checked: an inf loss with finite gradients was stepped
    # on (LBFGS reads that loss), and only a later evaluation's would roll back (max_iter=1: none).
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1.0, max_iter=1), on_nonfinite=mode, names=["w"])

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss + float("inf")

    before = w.detach().clone()
    if mode == "raise":
        with pytest.raises(NonFiniteGradError, match="evaluation 1 .* non-finite loss"):
            opt.step(closure)
    else:
        opt.step(closure)
    assert torch.equal(w.detach(), before) and not opt.optimizer.state
    assert bool(opt.last.skipped) and opt.summary()["skipped"] == 1


def _lbfgs_problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64) * 10
    return a, b


def _lbfgs_closure(w, zero_grad, spoil):
    """The least-squares closure of _lbfgs_problem over `w`; after each backward,
    spoil(n, loss) (evaluation n, from 1) may write into w.grad and returns the loss to return.
    Also returns the evaluation counter (a one-element list)."""
    a, b = _lbfgs_problem()
    n = [0]

    def closure():
        n[0] += 1
        zero_grad()
        loss = ((a @ w - b) ** 2).sum()
        loss.backward()
        return spoil(n[0], loss)

    return closure, n


@pytest.mark.parametrize("bad_eval", [1, 2], ids=["first_evaluation", "later_evaluation"])
def test_lbfgs_zero_mode_zeroes_every_evaluations_nonfinite_gradient(bad_eval):
    # "zero" mode used to check only the first evaluation: a NaN gradient in a later one, inside
    # LBFGS.step(), made every parameter NaN (reported as a clean step).
    def run(guarded):
        w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        inner = torch.optim.LBFGS([w], lr=1, max_iter=5)
        opt = GradGuard(inner, on_nonfinite="zero") if guarded else inner

        def spoil(n, loss):
            if n == bad_eval:
                w.grad[0] = float("nan") if guarded else 0.0  # the reference: the NaN zeroed by hand
            return loss

        opt.step(_lbfgs_closure(w, inner.zero_grad, spoil)[0])
        return w.detach(), opt

    got, opt = run(True)
    want, _ = run(False)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert not bool(opt.last.skipped)


def test_lbfgs_rollbacks_count_toward_max_consecutive_skips():
    # A rolled-back step reset the streak (its first evaluation was finite) and then added one:
    # the streak stayed at 1 and max_consecutive_skips never fired.
    a, b = _lbfgs_problem()
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    inner = torch.optim.LBFGS([w], lr=1, max_iter=5)
    opt = GradGuard(inner, max_consecutive_skips=2)
    n = [0]

    def closure():
        n[0] += 1
        inner.zero_grad()
        loss = ((a @ w - b) ** 2).sum()
        if n[0] % 2 == 0:  # every step's second evaluation
            loss = loss * float("nan")
        loss.backward()
        return loss

    opt.step(closure)
    assert bool(opt.last.skipped) and opt.summary()["consecutive_skips"] == 1
    with pytest.raises(NonFiniteGradError, match="2 steps in a row"):
        opt.step(closure)
    assert opt.summary()["consecutive_skips"] == 2 and opt.summary()["skipped"] == 2


def test_an_lbfgs_rollback_names_its_evaluation_in_the_max_consecutive_skips_error():
    # The message was built from the first evaluation's statistics (finite, norm ~1): "the
    # gradient norm overflows float32", for a step undone by evaluation 2's NaN gradient.
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1, max_iter=5), max_consecutive_skips=1)

    def spoil(n, loss):
        if n == 2:
            w.grad[0] = float("nan")
        return loss

    closure, _ = _lbfgs_closure(w, opt.zero_grad, spoil)
    with pytest.raises(NonFiniteGradError, match=r"1 step was skipped .*: gradguard.GradGuard: evaluation 2 of the "
                       r"closure inside LBFGS.step\(\) gave a non-finite loss or gradients$") as err:
        opt.step(closure)
    assert "overflow" not in str(err.value)
    assert torch.equal(w.detach(), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("bad_eval", [1, 2], ids=["first_evaluation", "later_evaluation"])
@pytest.mark.parametrize("as_number", ["float", "numpy"])
def test_lbfgs_checks_a_loss_returned_as_a_number(bad_eval, as_number):
    # LBFGS takes any closure result float() reads; a non-finite Python float loss (loss.item())
    # was not checked, and its line search stepped on it.
    np = pytest.importorskip("numpy")
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = GradGuard(torch.optim.LBFGS([w], lr=1, max_iter=5))

    def spoil(k, loss):
        value = loss.item() * (math.inf if k == bad_eval else 1.0)
        return value if as_number == "float" else np.float64(value)

    closure, n = _lbfgs_closure(w, opt.zero_grad, spoil)
    opt.step(closure)
    assert bool(opt.last.skipped) and torch.equal(w.detach(), torch.zeros(5, dtype=torch.float64))
    assert not opt.optimizer.state
    n[0] = 10  # finite from now on: steps on the float loss
    opt.step(closure)
    assert not bool(opt.last.skipped) and not torch.equal(w.detach(), torch.zeros(5, dtype=torch.float64))


def test_report_host_views():
    model = TinyNet()
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5, model=model)
    model(torch.randn(4, 8)).sum().backward()
    model.fc1.bias.grad[2] = float("inf")
    model.fc2.weight.grad.mul_(100.0)
    opt.step()
    rep = opt.last
    assert rep.nonfinite_layers == ["fc1.bias"]
    worst = rep.worst_layers(2)
    assert worst[0] == ("fc1.bias", math.inf) and worst[1][0] == "fc2.weight"
    d = rep.as_dict(layers=True)
    assert d["skipped"] and d["found_inf"] and d["step"] == 1 and not d["clipped"]
    assert d["layers"]["fc1.bias"]["inf"] == 1 and d["layers"]["fc2.weight"]["nan"] == 0
    torch.testing.assert_close(torch.tensor(d["layers"]["fc2.weight"]["norm"]),
                               model.fc2.weight.grad.norm(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="`k`"):
        rep.worst_layers(-1)


@pytest.mark.parametrize("limit", [-1.0, math.nan], ids=["negative", "nan"])
@pytest.mark.parametrize("mode", ["zero", "ignore", "skip"])
def test_a_max_norm_tensor_made_invalid_in_place_never_clips(mode, limit, device, monkeypatch):
    # A max_norm tensor is checked when it is handed over; a schedule that later writes a negative
    # or NaN value into it (a device tensor, which is never read back) must not become a
    # negative or NaN clip coefficient: in "zero" mode that flipped the update into an ascent
    # step or made the weights NaN. (A CPU tensor is refused at the step instead: the next test;
    # here a CPU one stands in for a device one.)
    monkeypatch.setattr(optim_mod, "_limit_read_free", lambda t: False)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], device=device))
    limit_t = torch.tensor(0.5, device=device)
    opt = GradGuard(torch.optim.SGD([w], lr=0.1), max_norm=limit_t, on_nonfinite=mode)
    limit_t.fill_(limit)
    grad = torch.tensor([3.0, math.nan if mode == "zero" else 4.0, 12.0], device=device)
    w.grad = grad.clone()
    opt.step()
    assert bool(opt.last.found_inf) and float(opt.last.clip_coef) == 1.0
    if mode == "skip":
        assert torch.equal(w.detach(), torch.tensor([1.0, 2.0, 3.0], device=device))
    else:  # stepped with the gradient as it came (its NaN zeroed in "zero" mode), not clipped
        want = torch.tensor([1.0, 2.0, 3.0], device=device) - 0.1 * grad.nan_to_num(nan=0.0)
        assert torch.equal(w.detach(), want)



@pytest.mark.parametrize("limit", [-1.0, math.nan], ids=["negative", "nan"])
@pytest.mark.parametrize("mode", ["zero", "ignore", "skip", "raise"])
def test_a_cpu_max_norm_tensor_made_invalid_in_place_is_refused_at_the_step(mode, limit):
    # Its value costs nothing to read: refused as the assignment is, with nothing stepped or
    # recorded (it made the step non-finite, and "raise" blamed a gradient-norm overflow).
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    limit_t = torch.tensor(0.5)
    opt = GradGuard(torch.optim.SGD([w], lr=0.1, momentum=0.9), max_norm=limit_t, on_nonfinite=mode)
    w.grad = torch.tensor([3.0, 4.0, 12.0])
    opt.step()
    state = {k: v.clone() for k, v in opt.optimizer.state[w].items()}
    before, last = w.detach().clone(), opt.last
    limit_t.fill_(limit)
    with pytest.raises(ValueError, match=r"`max_norm` must be a non-negative number, got tensor\((-1.0|nan)\)"):
        opt.step()
    assert torch.equal(w.detach(), before) and opt.last is last and opt.summary()["steps"] == 1
    assert all(torch.equal(v, state[k]) for k, v in opt.optimizer.state[w].items())
    limit_t.fill_(0.5)  # mended: steps again
    opt.step()
    assert opt.summary()["steps"] == 2 and not bool(opt.last.skipped)


@pytest.mark.parametrize("kw", [{"on_nonfinite": "raise"}, {"max_consecutive_skips": 1}])
def test_a_device_max_norm_made_invalid_is_named_in_the_error(kw, monkeypatch):
    # The error blamed a gradient-norm overflow ("every gradient element is finite, but the
    # gradient norm overflows float32") for finite gradients of norm 13. (A CPU tensor stands in
    # for a device one, which the step does not read.)
    monkeypatch.setattr(optim_mod, "_limit_read_free", lambda t: False)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    limit_t = torch.tensor(0.5)
    opt = GradGuard(torch.optim.SGD([w], lr=0.1), max_norm=limit_t, names=["w"], **kw)
    limit_t.fill_(-2.0)
    w.grad = torch.tensor([3.0, 4.0, 12.0])
    with pytest.raises(NonFiniteGradError) as err:
        opt.step()
    msg = str(err.value)
    assert "the tensor `max_norm` is -2.0" in msg and "overflow" not in msg, msg
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_if_known_on_the_host(fused, device):
    w = torch.nn.Parameter(torch.ones(4, device=device))
    opt = GradGuard(torch.optim.AdamW([w], lr=0.1, fused=fused), max_norm=1.0)
    known = []
    for bad in (False, True, False):
        w.grad = torch.full((4,), math.nan if bad else 0.5, device=device)
        opt.step()
        known.append(opt.last.skipped_if_known())
    if device == "cuda" and fused:
        # The first step, before the fused state exists, is decided on the host (one read); the
        # later ones on the device: the host does not know them without a read.
        assert known == [False, None, None]
    else:
        assert known == [False, True, False]


def test_a_compiled_step_keeps_its_report():
    # The way torch documents compiling an optimizer step: under dynamo the guard's report was
    # lost (opt.last stayed None) while the step itself ran.
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))]
    ref_params = [torch.nn.Parameter(params[0].detach().clone())]
    opt = GradGuard(torch.optim.AdamW(params, lr=0.1), max_norm=0.5)
    ref = GradGuard(torch.optim.AdamW(ref_params, lr=0.1), max_norm=0.5)

    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    @torch.compile(backend="eager")
    def compiled_step():
        opt.step()

    for k, g in enumerate((1.0, math.nan, 2.0)):
        params[0].grad = torch.full((8, 4), g)
        ref_params[0].grad = torch.full((8, 4), g)
        compiled_step()
        ref.step()
        assert opt.last is not None and opt.last.step == k + 1
        assert bool(opt.last.skipped) == math.isnan(g)
        assert torch.equal(params[0], ref_params[0])
    # Once per step: the step run outside dynamo called guard.step() again, hooks and all (an EMA
    # post-hook averaged twice per step).
    assert calls == ["pre", "post"] * 3, calls


def test_global_optimizer_hooks_run_once_per_guarded_step():
    # torch's global step hooks (the profiler's step counter is one) ran for the guard and again
    # for the inner optimizer's step inside it: two per training step, one on a skipped one.
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    p = torch.nn.Parameter(torch.zeros(3))
    opt = GradGuard(torch.optim.SGD([p], lr=0.1))
    inner_hook = []
    opt.optimizer.register_step_post_hook(lambda o, a, k: inner_hook.append(1))
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__)))]
    try:
        for g in (1.0, math.nan, 2.0):
            p.grad = torch.full((3,), g)
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == [("pre", "GradGuard"), ("post", "GradGuard")] * 3, seen
    assert len(inner_hook) == 2  # the inner optimizer's own hooks still run on its two steps
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks  # removed, not kept by the guard


@pytest.mark.parametrize("model", [lambda m: torch.nn.Sequential(torch.nn.Linear(4, 2)), lambda m: torch.nn.ReLU()])
def test_a_model_that_holds_none_of_the_parameters_is_warned_about(model):
    # Before, every layer was named param[i] without a word. A warning, not an error (model= may be
    # there for the eval() check alone), given when the layers are named: at the first step, after
    # any add_param_group.
    m = torch.nn.Linear(4, 2)
    opt = GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), model=model(m))
    m(torch.ones(1, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"`model` \((Sequential|ReLU)\) holds none of the optimizer's parameters"):
        opt.step()
    # Parameters of the model added after construction: named, no warning.
    temp = torch.nn.Parameter(torch.zeros(()))
    opt = GradGuard(torch.optim.SGD([temp], lr=0.1), model=m)
    opt.add_param_group({"params": list(m.parameters())})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert {n for n, _ in opt.last.worst_layers(3)} == {"weight", "bias"}
    # The same module wrapped (compiled, in a container) holds them: named, no warning.
    for wrapped in (torch.compile(m), torch.nn.ModuleDict({"net": m})):
        opt = GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), model=wrapped)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert {n for n, _ in opt.last.worst_layers(2)} in ({"weight", "bias"}, {"net.weight", "net.bias"})


def test_a_new_set_of_parameters_with_gradients_under_a_capture_is_refused(monkeypatch):
    # Its index is copied from the host, which a CUDA graph capture cannot hold (a copy from
    # pageable memory, made before, failed inside the capture with CUDA's error). Where no GPU
    # exists the capture is emulated (tests/test_cuda_graphs.py runs the real one).
    from gradguard import optim as optim_mod

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="eager warm-up step in which the same parameters have gradients"):
        optim_mod._index_tensor([0, 2], torch.device("cuda"))
    assert torch.equal(optim_mod._index_tensor([0, 2], torch.device("cpu")), torch.tensor([0, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float8_e4m3fn])
def test_a_max_norm_schedule_written_in_place_is_followed_in_every_dtype(dtype):
    # An integer or float8 max_norm was converted to a float64 copy when given: a schedule
    # written into it afterwards was ignored (clip_coef stayed 1.0 where float32's was 0.2).
    w = torch.nn.Parameter(torch.zeros(2))
    limit = torch.tensor(8.0).to(dtype)
    opt = GradGuard(torch.optim.SGD([w], lr=0.0), max_norm=limit)
    w.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert float(opt.last.clip_coef) == 1.0
    limit.fill_(1)
    w.grad = torch.tensor([3.0, 4.0])
    opt.step()
    torch.testing.assert_close(opt.last.clip_coef, torch.tensor(0.2), rtol=1e-6, atol=0)

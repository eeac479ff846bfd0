"""What a sweep of bad arguments over the public API found (2026-12-07): each was accepted and went
wrong later, or raised a message from deep inside torch that named no argument. Both kernel paths
(the suite runs again with GRADGUARD_DISABLE_EXT=1)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import gradguard
from gradguard import ArgumentTypeError, GradGuard, NanTracer, PercentileClip, ZScoreClip


def _param(*values, dtype=torch.float32):
    p = torch.nn.Parameter(torch.zeros(len(values), dtype=dtype))
    p.grad = torch.tensor(values, dtype=dtype)
    return p


def _guarded_linear(**kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return model, GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def _backward(model):
    model.zero_grad()
    model(torch.ones(2, 2)).sum().backward()


@pytest.mark.parametrize("total", [-1.0, -2e-6, torch.tensor(-3.0), -math.inf, torch.tensor(-math.inf)])
def test_a_negative_total_norm_leaves_the_grads_untouched(total):
    # torch multiplies by max_norm / (total + 1e-6): [3, 4] became [-3e6, -4e6] at -2e-6.
    p = _param(3.0, 4.0)
    gradguard.clip_grads_with_norm_([p], 1.0, total)
    assert p.grad.tolist() == [3.0, 4.0]


def test_a_total_norm_past_float_range_is_infinite_and_leaves_the_grads_untouched():
    p = _param(3.0, 4.0)
    gradguard.clip_grads_with_norm_([p], 1.0, 10 ** 400)
    assert p.grad.tolist() == [3.0, 4.0]
    gradguard.clip_grads_with_norm_([p], 1.0, 0.0)  # a zero norm still clips nothing up
    assert p.grad.tolist() == [3.0, 4.0]


def test_zero_dim_numpy_arrays_are_numbers_as_in_torch():
    p = _param(3.0, 4.0)
    assert float(gradguard.clip_grad_norm_([p], np.array(10.0), np.array(2.0))) == 5.0
    gradguard.clip_grads_with_norm_([p], np.float32(1.0), np.array(5.0))
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-6, atol=0)
    with pytest.raises(ArgumentTypeError, match="`max_norm`"):
        gradguard.clip_grad_norm_([p], np.array([1.0, 2.0]))


@pytest.mark.parametrize("call, name", [
    (lambda: gradguard.clip_grad_norm_([_param(3.0, 4.0)], 10 ** 400), "max_norm"),
    (lambda: gradguard.grad_stats([torch.ones(2)], 10 ** 400), "norm_type"),
    (lambda: ZScoreClip(z=10 ** 400), "z"),
    (lambda: PercentileClip(q=10 ** 400), "q"),
])
def test_integers_past_float_range_are_refused_by_name(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


def test_meta_tensors_as_values_are_refused_by_name():
    meta = torch.tensor(1.0, device="meta")
    with pytest.raises(ValueError, match="`max_norm` is a meta tensor"):
        GradGuard(torch.optim.SGD([_param(1.0)], lr=0.1), max_norm=meta)
    with pytest.raises(ValueError, match="`max_norm` is a meta tensor"):
        gradguard.clip_grad_norm_([_param(3.0, 4.0)], meta)
    with pytest.raises(ValueError, match="`total_norm` is a meta tensor"):
        gradguard.clip_grads_with_norm_([_param(3.0, 4.0)], 1.0, meta)
    with pytest.raises(ValueError, match="`eps` is a meta tensor"):
        gradguard.safe_log(torch.ones(2), eps=meta)


def test_a_meta_gradient_is_named_in_clip_grad_norm():
    p = _param(1.0, 2.0)
    q = torch.nn.Parameter(torch.zeros(2, device="meta"))
    q.grad = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="the gradient of 'b' is on the meta device"):
        gradguard.clip_grad_norm_([("a", p), ("b", q)], 1.0)


def test_the_tracer_class_instead_of_an_instance_is_refused():
    # Accepted before: step() counted a taken step, then failed in the tracer without stepping.
    with pytest.raises(TypeError, match="`tracer` must be a gradguard.NanTracer"):
        _guarded_linear(tracer=NanTracer)


def test_a_spike_policy_belongs_to_one_guard():
    # Shared, each guard clipped by the other's norms: A's first step (warm-up not reached) was
    # clipped to 0.001 by B's.
    policy = ZScoreClip(z=2.0, warmup=3)
    first = _guarded_linear(spike=policy)
    with pytest.raises(ValueError, match="belongs to another GradGuard"):
        _guarded_linear(spike=policy)
    assert first[1].spike is policy


def test_a_refused_guard_leaves_its_spike_policy_free():
    policy = PercentileClip()
    with pytest.raises(ValueError, match="on_nonfinite"):
        _guarded_linear(spike=policy, on_nonfinite="maybe")
    model, guard = _guarded_linear(spike=policy)
    _backward(model)
    guard.step()
    assert guard.spike is policy


def test_copies_of_a_policy_and_of_a_guard_belong_to_their_own_guards():
    import copy
    import pickle

    model, guard = _guarded_linear(spike=ZScoreClip(warmup=2))
    for _ in range(3):
        _backward(model)
        guard.step()
    clone = copy.deepcopy(guard)
    assert clone.spike is not guard.spike and clone.spike._guard() is clone and guard.spike._guard() is guard
    with pytest.raises(ValueError, match="belongs to another GradGuard"):
        _guarded_linear(spike=clone.spike)
    # What the error says to do: a copy of the policy, alone or through pickle, starts from its
    # statistics in a new guard.
    for copied in (copy.deepcopy(guard.spike), pickle.loads(pickle.dumps(guard.spike))):
        _, other = _guarded_linear(spike=copied)
        assert torch.equal(other.spike._state, guard.spike._state)


def test_a_policy_whose_guard_is_gone_can_be_given_to_a_new_one():
    import gc

    policy = ZScoreClip()
    model, guard = _guarded_linear(spike=policy)
    _backward(model)
    guard.step()
    del guard
    gc.collect()
    _, again = _guarded_linear(spike=policy)  # an optimizer rebuilt around the same policy
    assert again.spike is policy


def test_a_refused_guard_state_load_changes_nothing():
    model, guard = _guarded_linear(spike=ZScoreClip(warmup=2))
    for _ in range(3):
        _backward(model)
        guard.step()
    saved = guard.guard_state_dict()
    bad = dict(saved, steps=None)
    model2, other = _guarded_linear(spike=ZScoreClip(warmup=2))
    _backward(model2)
    other.step()
    before = other.guard_state_dict()
    with pytest.raises(ValueError, match=r"\['steps'\] must be an int >= 0, got NoneType None"):
        other.load_guard_state_dict(bad)
    after = other.guard_state_dict()
    assert after["history"]["steps"] == before["history"]["steps"] == [1]
    assert after["steps"] == 1
    torch.testing.assert_close(after["spike"]["mean"], before["spike"]["mean"], rtol=0, atol=0)
    _backward(model2)
    other.step()  # still usable
    assert other.summary()["steps"] == 2


def test_a_refused_optimizer_load_leaves_the_guard_state_as_it_was():
    model, guard = _guarded_linear()
    for _ in range(3):
        _backward(model)
        guard.step()
    full = guard.state_dict()
    full["param_groups"] = full["param_groups"] + full["param_groups"]  # torch refuses: 2 groups for 1
    model2, other = _guarded_linear()
    _backward(model2)
    other.step()
    with pytest.raises(ValueError):
        other.load_state_dict(full)
    assert other.summary()["steps"] == 1
    assert other.guard_state_dict()["history"]["steps"] == [1]


def test_an_integer_gradient_is_named():
    q = _param(1.0, 2.0)
    opt = torch.optim.SGD([q], lr=0.1)
    t = torch.zeros(2, dtype=torch.int64)
    t.grad = torch.ones(2, dtype=torch.int64)
    opt.param_groups[0]["params"].append(t)
    with pytest.raises(TypeError, match=r"gradient of 'param\[1\]' has dtype torch.int64"):
        GradGuard(opt).step()
    assert q.detach().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
def test_clip_refusals_name_the_parameter_and_the_layout(layout):
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    if layout == "sparse":
        p = torch.nn.Parameter(torch.zeros(2, 2))
        p.grad = g.to_sparse()
    else:  # an MKLDNN parameter, whose gradient is one too
        p = torch.zeros(2, 2).to_mkldnn().requires_grad_()
        p.grad = g.to_mkldnn()
    kind = "sparse_coo" if layout == "sparse" else "_mkldnn"
    for call in (lambda: gradguard.clip_grad_norm_([("w", p)], 1.0),
                 lambda: gradguard.clip_grads_with_norm_([("w", p)], 1.0, 5.0)):
        with pytest.raises(TypeError, match=f"the gradient of 'w' is a tensor of layout torch.{kind}"):
            call()


def test_an_mkldnn_tensor_in_grad_stats_is_refused_by_position():
    with pytest.raises(TypeError, match=r"tensors\[1\] is a tensor of layout torch._mkldnn"):
        gradguard.grad_stats([torch.ones(2), torch.ones(2, 2).to_mkldnn()])


@pytest.mark.parametrize("make", [
    lambda: GradGuard(torch.optim.SGD([_param(1.0)], lr=0.1), history_size="5"),
    lambda: GradGuard(torch.optim.SGD([_param(1.0)], lr=0.1), max_consecutive_skips="3"),
    lambda: ZScoreClip(z="2"),
    lambda: PercentileClip(window=2.0),
    lambda: NanTracer(torch.nn.Linear(2, 1), batch_dim="0"),
])
def test_wrong_kinds_are_argument_type_errors(make):
    with pytest.raises(ArgumentTypeError):
        make()


def test_numpy_integers_are_counts_everywhere():
    model, guard = _guarded_linear()
    _backward(model)
    guard.step()
    assert len(guard.last.worst_layers(np.int64(1))) == 1
    assert len(guard.summary(np.int64(1))["worst_layers"]) == 1


@pytest.mark.parametrize("flag", ["check_ops", "keep_tensors"])
def test_tracer_flags_are_booleans(flag):
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        NanTracer(torch.nn.Linear(2, 1), **{flag: "false"})  # bool("false") is True
    tracer = NanTracer(torch.nn.Linear(2, 1), **{flag: np.False_})
    assert getattr(tracer, flag) is False
    tracer.remove()


@pytest.mark.parametrize("loss", [{"loss": torch.tensor(1.0)}, "nan"])
def test_the_tracer_names_a_loss_of_the_wrong_kind(loss):
    model = torch.nn.Linear(2, 1)
    tracer = NanTracer(model)
    model(torch.ones(3, 2)).sum().backward()
    with pytest.raises(ArgumentTypeError, match="`loss` must be a tensor or a number"):
        tracer.first_nonfinite(loss=loss)
    tracer.remove()


@pytest.mark.parametrize("field, value", [
    (("history", "values"), torch.zeros(1000, 2, dtype=torch.float64)),  # taken before: every later step raised
    (("history", "count"), "3"),
    (("totals",), torch.zeros(2, dtype=torch.int64)),
    (("layer_max_norm",), None),
])
def test_a_malformed_guard_checkpoint_field_is_named_and_nothing_loads(field, value):
    model, guard = _guarded_linear()
    for _ in range(2):
        _backward(model)
        guard.step()
    sd = guard.state_dict()
    target = sd["gradguard"]
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    sd["param_groups"][0]["lr"] = 0.5
    model2, other = _guarded_linear()
    _backward(model2)
    other.step()
    with pytest.raises(ValueError, match=f"\\['{field[-1]}'\\] must be"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.1
    assert other.summary()["steps"] == 1
    _backward(model2)
    other.step()


def test_a_checkpoint_in_other_dtypes_loads_in_the_decision_ops_dtypes():
    # A guard state cast to float32/int32 (a checkpoint converted wholesale) loaded, and every
    # later step raised inside guard_decide.
    model, guard = _guarded_linear()
    for _ in range(2):
        _backward(model)
        guard.step()
    sd = guard.guard_state_dict()
    sd["history"]["values"] = sd["history"]["values"].float()
    sd["layer_max_norm"] = sd["layer_max_norm"].float()
    sd["layer_nonfinite"] = sd["layer_nonfinite"].int()
    model2, other = _guarded_linear()
    other.load_guard_state_dict(sd)
    _backward(model2)
    other.step()
    assert other.summary()["steps"] == 3 and other.history.as_dict()["step"] == [1, 2, 3]


def test_a_malformed_spike_entry_loads_nothing():
    # Past the field checks, the policy's own load raised half-way (a KeyError for a missing
    # buffer): the guard's state is rolled back whole.
    model, guard = _guarded_linear(spike=PercentileClip(window=4, warmup=2))
    for _ in range(3):
        _backward(model)
        guard.step()
    sd = guard.guard_state_dict()
    del sd["spike"]["buf"]
    model2, other = _guarded_linear(spike=PercentileClip(window=4, warmup=2))
    _backward(model2)
    other.step()
    before = other.guard_state_dict()
    with pytest.raises(KeyError):
        other.load_guard_state_dict(sd)
    after = other.guard_state_dict()
    assert after["steps"] == before["steps"] == 1
    assert torch.equal(after["spike"]["buf"], before["spike"]["buf"], ) or torch.allclose(
        after["spike"]["buf"], before["spike"]["buf"], equal_nan=True)


def test_numbers_as_numpy_arrays_in_the_safe_ops_and_warmup_bounds():
    x = torch.tensor([0.0, 1.0])
    assert torch.equal(gradguard.safe_log(x, eps=np.array(1e-3)), gradguard.safe_log(x, eps=1e-3))
    with pytest.raises(ValueError, match="`warmup` must be an int in"):
        ZScoreClip(warmup=2 ** 2000)  # accepted before: the first step raised a bare OverflowError


@pytest.mark.parametrize("call, where", [
    (lambda x: gradguard.grad_stats(x), "gradguard: `tensors`"),
    (lambda x: gradguard.all_finite(x), "gradguard: `tensors`"),
    (lambda x: gradguard.get_total_norm(x), "gradguard.get_total_norm: `tensors`"),
    (lambda x: gradguard.clip_grad_norm_(x, 1.0), "gradguard.clip_grad_norm_: `parameters`"),
])
@pytest.mark.parametrize("value", [None, 5])
def test_a_value_that_is_not_iterable_is_named(call, where, value):
    # Python's own message, "'NoneType' object is not iterable", names no argument.
    with pytest.raises(TypeError, match=f"^{re.escape(where)}.* must be a tensor or an iterable of tensors, "
                                        f"got {type(value).__name__}$"):
        call(value)


def test_iterables_that_are_not_lists_still_work():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    ref = gradguard.grad_stats(g).total_norm
    for it in (iter(g), (t for t in g), tuple(g)):
        assert torch.equal(gradguard.grad_stats(it).total_norm, ref)
    assert torch.equal(gradguard.get_total_norm(iter(g)), ref)

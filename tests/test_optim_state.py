"""GradGuard checkpoints, history and step hooks: a resumed run behaves as an uninterrupted one."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import gradguard
from gradguard import GradGuard
from optim_util import OPTIMIZERS, TinyNet, decide_on, make_params  # noqa: F401

POISONED = {3, 8}


def _batch(i):
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(16, 8, generator=gen)
    if i in POISONED:
        x[0, 0] = float("nan")
    return x, torch.sin(x[:, :1])


def _build(name, spike):
    torch.manual_seed(0)
    model = TinyNet()
    policy = {"zscore": lambda: gradguard.ZScoreClip(z=1.0, warmup=3),
              "percentile": lambda: gradguard.PercentileClip(q=0.5, window=4, warmup=3),
              None: lambda: None}[spike]()
    opt = GradGuard(OPTIMIZERS[name](model.parameters()), max_norm=5.0, spike=policy, model=model, history_size=6)
    return model, opt


def _train(model, opt, steps):
    for i in steps:
        x, y = _batch(i)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def _continue_alike(run, other, steps):
    """Trains two (model, guard) pairs on the same batches; they must end bit-identical."""
    for model, opt in (run, other):
        _train(model, opt, steps)
    for p, q in zip(run[0].parameters(), other[0].parameters()):
        assert torch.equal(p, q)
    assert other[1].summary() == run[1].summary()


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(((a == b) | (a.isnan() & b.isnan())).all()))  # NaN marks unfilled/poisoned slots
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("spike", ["zscore", "percentile", None])
@pytest.mark.parametrize("name", ["adamw_fused", "adamw_foreach", "sgd_momentum"])
def test_resume_equals_uninterrupted(name, spike, decide_on):
    model_a, opt_a = _build(name, spike)
    _train(model_a, opt_a, range(12))

    model_b, opt_b = _build(name, spike)
    _train(model_b, opt_b, range(6))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    _train(model_b, opt_b, range(6, 8))  # work after the checkpoint must not leak into it
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = _build(name, spike)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    _train(model_c, opt_c, range(6, 12))

    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    assert opt_a.summary() == opt_c.summary()
    assert repr(opt_a.history.as_dict()) == repr(opt_c.history.as_dict())  # repr: nan == nan
    assert _tensors_equal(opt_a.state_dict(), opt_c.state_dict())
    assert opt_a.summary()["skipped"] == 2


def test_spike_state_is_in_the_state_dict_and_checked_on_load():
    model, opt = _build("adamw_foreach", "zscore")
    _train(model, opt, range(5))
    sd = opt.state_dict()
    spike = sd["gradguard"]["spike"]
    assert spike["kind"] == "ZScoreClip" and int(spike["count"]) == 4  # one poisoned step not learned from
    _, plain = _build("adamw_foreach", None)
    with pytest.raises(ValueError, match="spike=None"):
        plain.load_state_dict(sd)
    _, other = _build("adamw_foreach", "percentile")
    before = other.optimizer.state_dict()
    with pytest.raises(ValueError, match="ZScoreClip spike state, not PercentileClip"):
        other.load_state_dict(sd)
    assert other.optimizer.state_dict() == before  # refused before anything was loaded
    torch.manual_seed(0)
    small = TinyNet()
    short = GradGuard(torch.optim.AdamW(small.parameters()), spike=gradguard.ZScoreClip(), history_size=3)
    with pytest.raises(ValueError, match="history_size=3"):
        short.load_state_dict(sd)
    seen = []
    opt.register_state_dict_post_hook(lambda o, d: seen.append(sorted(d)))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt.load_state_dict(opt.state_dict())
    assert seen == [["gradguard", "param_groups", "state"], "loaded"]
    # A plain optimizer checkpoint loads into a guard (the guard keeps its own state).
    _, fresh = _build("adamw_foreach", "zscore")
    fresh.load_state_dict(opt.optimizer.state_dict())
    assert fresh.optimizer.state_dict()["state"].keys() == opt.optimizer.state_dict()["state"].keys()


def test_history_ring_buffer_keeps_the_last_n_steps_oldest_first():
    model, opt = _build("sgd_momentum", None)
    _train(model, opt, range(10))
    h = opt.history.as_dict()
    assert h["step"] == [5, 6, 7, 8, 9, 10] and len(opt.history) == 6
    assert h["skipped"] == [False, False, False, False, True, False]  # batch 8 is step 9
    assert all(c <= 1.0 for c in h["clip_coef"])
    assert str(h["total_norm"][4]) == "nan" and all(n > 0 for i, n in enumerate(h["total_norm"]) if i != 4)
    assert opt.history._values.device == model.fc1.weight.device


def test_guard_state_alone_round_trips_beside_the_inner_optimizers():
    # What a checkpointer that keeps only the optimizer's state and param_groups needs (DCP,
    # FSDP.optim_state_dict): the guard's own state saved and loaded on its own.
    model, opt = _build("adamw_foreach", "zscore")
    _train(model, opt, range(6))
    buf = io.BytesIO()
    torch.save({"inner": opt.optimizer.state_dict(), "guard": opt.guard_state_dict(),
                "model": model.state_dict()}, buf)
    _train(model, opt, range(6, 10))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = _build("adamw_foreach", "zscore")
    model2.load_state_dict(saved["model"])
    opt2.optimizer.load_state_dict(saved["inner"])
    opt2.load_guard_state_dict(saved["guard"])
    _train(model2, opt2, range(6, 10))
    assert opt2.summary() == opt.summary()
    assert opt2.history.as_dict()["step"] == opt.history.as_dict()["step"]
    assert torch.equal(opt2.spike._state, opt.spike._state)
    for a, b in zip(model2.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="incomplete"):
        opt2.load_guard_state_dict({"version": 1})


def _replay_rows(opt, rows):
    """What the replays of a CUDA graph holding a guarded step do to the guard's state: the op
    writes ring row count % size and advances the device counters; no Python runs."""
    st = opt._state
    for norm, skipped in rows:
        slot = int(st.counters[4]) % st.history.size
        st.history._values[slot] = torch.tensor([norm, 1.0, float(skipped)], dtype=torch.float64)
        st.counters[4] += 1
        st.counters[0] += int(skipped)


@pytest.mark.parametrize("replays", [2, 9], ids=["within_the_ring", "past_the_ring"])
def test_steps_recorded_on_the_device_alone_are_counted(replays):
    # The history, summary() and the checkpoint took their step numbers from the host, which a
    # CUDA graph replay never runs: after replays they showed the capture-time steps.
    model, opt = _build("sgd_momentum", None)
    _train(model, opt, range(3))
    rows = [(float(10 + i), i == 1) for i in range(replays)]
    _replay_rows(opt, rows)
    h = opt.history.as_dict()
    total = 3 + replays
    assert h["step"] == list(range(max(1, total - 5), total + 1)) and len(opt.history) == min(total, 6)
    assert h["total_norm"][-min(replays, 6):] == [n for n, _ in rows][-6:]
    assert h["skipped"][-min(replays, 6):] == [b for _, b in rows][-6:]
    s = opt.summary()
    assert s["steps"] == 3 + replays and s["skipped"] == 1
    sd = opt.state_dict()["gradguard"]
    assert sd["steps"] == 3 + replays and sd["history"]["count"] == 3 + replays
    _train(model, opt, range(3, 4))  # an eager step after the replays numbers on from them
    assert opt.history.as_dict()["step"][-1] == 4 + replays and opt.last.step == 4 + replays


def test_step_hooks_get_every_report_and_can_be_removed():
    model, opt = _build("adamw_fused", None)
    seen = []
    handle = opt.add_step_hook(lambda guard, report: seen.append((guard is opt, report.as_dict())))
    _train(model, opt, range(5))
    assert [d["step"] for _, d in seen] == [1, 2, 3, 4, 5] and all(same for same, _ in seen)
    assert [d["skipped"] for _, d in seen] == [False, False, False, True, False]
    assert seen[3][1]["nonfinite_layers"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    handle.remove()
    _train(model, opt, range(5, 7))
    assert len(seen) == 5
    with pytest.raises(TypeError, match="`fn` must be callable"):
        opt.add_step_hook("print")


def test_summary_names_the_worst_layers():
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1), names=["a", "b", "c"])
    for i in range(3):
        for j, p in enumerate(params):
            p.grad = torch.full_like(p, 1.0 + j)
        if i < 2:
            params[1].grad[0] = float("inf")
        opt.step()
    s = opt.summary(k=2)
    assert s["steps"] == 3 and s["skipped"] == 2 and s["consecutive_skips"] == 0
    assert [w["name"] for w in s["worst_layers"]] == ["b", "c"]
    assert s["worst_layers"][0]["nonfinite_steps"] == 2
    torch.testing.assert_close(s["worst_layers"][1]["max_norm"], 3.0 * 24 ** 0.5)


def _named_groups_step(opt, params, bad):
    for q in params:
        q.grad = torch.ones_like(q) * 2.0
    bad.grad[0] = float("nan")
    opt.step()


def test_names_follow_their_parameters_when_a_group_is_removed():
    # names= was read by position: after the first group was removed, the second group's
    # parameters were reported under the first group's names, in the step and the summary.
    enc, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    inner = torch.optim.SGD([{"params": enc.parameters()}, {"params": head.parameters()}], lr=0.1)
    opt = GradGuard(inner, names=["enc.weight", "enc.bias", "head.weight", "head.bias"], hygiene=False)
    del opt.param_groups[0]
    _named_groups_step(opt, list(head.parameters()), head.bias)
    assert opt.last.nonfinite_layers == ["head.bias"] and opt.last.names == ["head.weight", "head.bias"]
    assert opt.summary()["worst_layers"][0]["name"] == "head.bias"
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})  # not named by names=: param[i]
    _named_groups_step(opt, list(head.parameters()) + [extra], extra)
    assert opt.last.nonfinite_layers == ["param[2]"]
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):  # identity kept in copies
        _named_groups_step(clone, [q for g in clone.param_groups for q in g["params"]],
                           clone.param_groups[0]["params"][0])
        assert clone.last.nonfinite_layers == ["head.weight"]
    # A parameter swapped inside its group (model surgery) takes the name of the one it replaced.
    new_bias = torch.nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"][1] = new_bias
    _named_groups_step(opt, [head.weight, new_bias, extra], new_bias)
    assert opt.last.nonfinite_layers == ["head.bias"] and opt.last.names == ["head.weight", "head.bias", "param[2]"]


def test_a_swapped_parameter_takes_a_name_only_from_its_own_slot():
    # By flat position, a parameter swapped into the first slot of group B after group A was
    # removed took A's first name; new parameters added after the last group was removed took
    # that group's names.
    ps = {k: torch.nn.Parameter(torch.zeros(2)) for k in ("a1", "a2", "b1", "b2", "c1", "c2")}
    groups = [{"params": [ps["a1"], ps["a2"]]}, {"params": [ps["b1"], ps["b2"]]}, {"params": [ps["c1"], ps["c2"]]}]
    opt = GradGuard(torch.optim.SGD(groups, lr=0.1), names=list(ps), hygiene=False)
    del opt.param_groups[0]
    new = torch.nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"][0] = new
    _named_groups_step(opt, [new, ps["b2"], ps["c1"], ps["c2"]], new)
    assert opt.last.names == ["b1", "b2", "c1", "c2"] and opt.last.nonfinite_layers == ["b1"]
    del opt.param_groups[-1]
    extra = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt.add_param_group({"params": extra})
    _named_groups_step(opt, [new, ps["b2"]] + extra, extra[0])
    assert opt.last.names == ["b1", "b2", "param[2]", "param[3]", "param[4]"]


def test_names_are_read_again_after_load_state_dict():
    # load_state_dict replaces param_groups (and with it the groups' param_names) but keeps the
    # params lists: a plan kept because the same parameters sat in the same lists reported the
    # names of before the load (found in review, 2026-12-07).
    import math

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = GradGuard(torch.optim.SGD(m.named_parameters(), lr=0.1), hygiene=False)
    _named_groups_step(opt, list(m.parameters()), m[1].weight)
    assert opt.last.nonfinite_layers == ["1.weight"]
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = ["enc.weight", "enc.bias", "head.weight", "head.bias"]
    opt.load_state_dict(sd)
    _named_groups_step(opt, list(m.parameters()), m[1].weight)
    assert opt.last.names == ["enc.weight", "enc.bias", "head.weight", "head.bias"]
    assert opt.last.nonfinite_layers == ["head.weight"] and not math.isfinite(opt.last.norms[2])


@pytest.mark.parametrize("groups_kind", ["dict", "OrderedDict", "UserList of groups"])
def test_the_plan_is_kept_across_steps_for_any_kind_of_groups(groups_kind):
    # torch keeps the group objects it is given (an OrderedDict stays one) and steps with any
    # iterable param_groups: the plan, read from them, must still be kept from step to step (an
    # OrderedDict group rebuilt it at every step, twice the step's time at 1,000 parameters) and
    # still follow a parameter swapped in.
    import collections

    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    kind = {"dict": dict, "OrderedDict": collections.OrderedDict, "UserList of groups": dict}[groups_kind]
    inner = torch.optim.SGD([kind(params=ps[:2]), kind(params=ps[2:])], lr=0.1)
    if groups_kind == "UserList of groups":
        inner.param_groups = collections.UserList(inner.param_groups)
    opt = GradGuard(inner, hygiene=False)
    _named_groups_step(opt, ps, ps[0])
    plan = opt._plan
    _named_groups_step(opt, ps, ps[1])
    assert opt._plan is plan and opt.last.nonfinite_layers == ["param[1]"]
    new = torch.nn.Parameter(torch.zeros(2))
    inner.param_groups[1]["params"][0] = new
    _named_groups_step(opt, ps[:2] + [new], new)
    assert opt._plan is not plan and opt.last.nonfinite_layers == ["param[2]"]


def test_a_complex_parameter_is_refused_with_model_given():
    # It raised AttributeError ('_warned') while naming the parameter, not the TypeError.
    m = torch.nn.Linear(2, 2).to(torch.cfloat)
    with pytest.raises(TypeError, match="is complex"):
        GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), model=m)


def test_summary_names_the_totals_right_after_the_groups_change():
    # The names were cached by position until the next step: after one group was removed and
    # another of the same size added, the totals (moved by identity) showed the old names.
    m = torch.nn.ModuleDict({k: torch.nn.Linear(2, 2) for k in "abc"})
    opt = GradGuard(torch.optim.SGD([{"params": m["a"].parameters()}, {"params": m["b"].parameters()}], lr=0.1),
                    model=m, hygiene=False)
    for k, q in m.named_parameters():
        q.grad = torch.full_like(q, 3.0 if k.startswith("b") else 1.0)
    opt.step()
    del opt.param_groups[0]
    opt.add_param_group({"params": m["c"].parameters()})
    peaks = {w["name"]: w["max_norm"] for w in opt.summary(k=4)["worst_layers"]}
    assert set(peaks) == {"b.weight", "b.bias", "c.weight", "c.bias"}
    assert peaks["b.weight"] == pytest.approx(6.0) and peaks["c.weight"] == 0.0


def test_wrapped_models_are_named_as_the_model_inside():
    # torch.compile's OptimizedModule and checkpoint_wrapper add their own parts to the names
    # (`_orig_mod.1.bias`): the same layer read two ways, as FSDP1's prefix (already removed).
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    wrapped = torch.nn.Sequential(checkpoint_wrapper(inner[0]), inner[1])
    for model in (torch.compile(inner, backend="eager"), wrapped):
        assert any("_orig_mod." in n or "_checkpoint_wrapped_module." in n for n, _ in model.named_parameters())
        opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, hygiene=False)
        for q in model.parameters():
            q.grad = torch.ones_like(q)
        inner[0].bias.grad[0] = float("nan")
        opt.step()
        assert opt.last.names == ["0.weight", "0.bias", "1.weight", "1.bias"] and opt.last.nonfinite_layers == ["0.bias"]
    # Only whole components are a wrapper's: a user's attribute ending in one is kept.
    user = torch.nn.Module()
    user.my_orig_mod = torch.nn.Linear(2, 2)
    opt = GradGuard(torch.optim.SGD(user.parameters(), lr=0.1), model=torch.compile(user, backend="eager"))
    assert opt._names(opt._params()) == ["my_orig_mod.weight", "my_orig_mod.bias"]


def test_data_parallel_wrappers_are_named_as_the_model_inside():
    # DDP's and DataParallel's `module.` is a wrapper's part too (it was kept: `module.0.weight`),
    # found by the wrapper's path: a user's own attribute named `module` stays.
    holder = torch.nn.Module()
    holder.module = torch.nn.Linear(2, 2)
    cases = [(torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 2))), ["0.weight", "0.bias"]),
             (torch.compile(torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 2))), backend="eager"),
              ["0.weight", "0.bias"]),
             (torch.nn.DataParallel(holder), ["module.weight", "module.bias"]),
             (torch.nn.Sequential(holder), ["0.module.weight", "0.module.bias"])]
    for model, want in cases:
        opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        assert opt._names(opt._params()) == want


def test_deepcopy_and_pickle_keep_the_whole_guard():
    import copy
    import pickle

    model, opt = _build("adamw_foreach", "zscore")
    _train(model, opt, range(4))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, GradGuard) and clone.optimizer is not opt.optimizer
        assert clone.summary() == opt.summary()
        assert _tensors_equal(clone.state_dict()["gradguard"], opt.state_dict()["gradguard"])


def test_copies_of_a_guard_with_an_lr_scheduler_step_themselves():
    # The scheduler wraps step() on the instance, with a weak reference to the original guard: a
    # copy that kept the wrapper stepped the original, and pickling it failed.
    import copy
    import pickle

    p = torch.nn.Parameter(torch.zeros(3))
    opt = GradGuard(torch.optim.SGD([p], lr=1.0))
    torch.optim.lr_scheduler.StepLR(opt, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = clone.param_groups[0]["params"][0]
        p.grad, q.grad = torch.ones(3), torch.full((3,), 5.0)
        clone.step()
        assert torch.equal(q, torch.full((3,), -5.0)) and torch.equal(p, torch.zeros(3))
        assert clone.last is not None and opt.last is None


def test_a_parameter_swapped_inside_its_group_list_is_the_one_checked(decide_on):
    """The list keeps its id and length; a plan that kept the old parameter let the new one's
    NaN through (it stepped to NaN) and named the old one."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=1.0, model=model)
    for q in model.parameters():
        q.grad = torch.ones_like(q)
    opt.step()
    new = torch.nn.Parameter(torch.zeros(1, 2))
    opt.param_groups[0]["params"][2] = new   # in place of model[1].weight
    model[1].weight = new
    for q in model.parameters():
        q.grad = torch.ones_like(q)
    new.grad = torch.tensor([[float("nan"), 1.0]])
    before = [q.detach().clone() for q in model.parameters()]
    opt.step()
    assert bool(opt.last.skipped) and opt.last.nonfinite_layers == ["1.weight"]
    assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before))
    new.grad = torch.full((1, 2), 10.0)   # and a finite step clips the new parameter's grad too
    opt.step()
    torch.testing.assert_close(opt.last.total_norm, torch.tensor((3 * 2 + 2 + 1 + 200.0) ** 0.5))


def test_parameters_converted_in_place_get_a_new_plan(decide_on):
    """model.double() keeps the Parameter objects: the guard's norms follow the new dtype."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1, fused=True), max_norm=0.1)  # no state to convert
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    model.double()
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    want = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])
    opt.step()
    assert opt.last.total_norm.dtype == torch.float64
    torch.testing.assert_close(opt.last.total_norm, want, rtol=1e-15, atol=0)


def test_a_deleted_guard_frees_its_state_without_the_cycle_collector():
    # The history once pointed back at the guard's state: a cycle that kept the ring (up to
    # 240 MB on the device) alive until the cyclic collector ran.
    import gc
    import weakref

    model, opt = _build("sgd_momentum", None)
    _train(model, opt, range(2))
    opt.history.as_dict()
    state, ring = weakref.ref(opt._state), weakref.ref(opt._state.history)
    gc.disable()
    try:
        del opt
        assert state() is None and ring() is None
    finally:
        gc.enable()


def test_a_copied_fused_guard_steps_as_the_original():
    # torch's Optimizer.__getstate__ drops the fused optimizer's amp-scaling flag: the copy
    # clipped through another path (parameters 1.5e-8 apart after one clipped step).
    model, opt = _build("adamw_fused", None)
    _train(model, opt, range(3))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2._fused_ready() and opt2.optimizer._step_supports_amp_scaling
    _continue_alike((model, opt), (model2, opt2), range(3, 7))


def test_a_guard_state_for_another_parameter_count_is_refused():
    model, opt = _build("sgd_momentum", None)
    _train(model, opt, range(2))
    saved = opt.guard_state_dict()
    small = torch.nn.Linear(2, 2)
    other = GradGuard(torch.optim.SGD(small.parameters(), lr=0.1), max_norm=5.0, history_size=6)
    with pytest.raises(ValueError, match=r"for 4 parameters but this GradGuard's optimizer has 2"):
        other.load_guard_state_dict(saved)


def test_a_checkpoint_without_spike_state_starts_the_policy_afresh():
    model, opt = _build("sgd_momentum", "zscore")
    _train(model, opt, range(5))
    assert opt.spike._state is not None
    saved = opt.state_dict()
    saved["gradguard"]["spike"] = None  # what the refusal message for changed hyperparameters advises
    opt.load_state_dict(saved)
    assert opt.spike._state is None


def test_a_subclassed_policy_reloads_its_own_checkpoint():
    class MyClip(gradguard.ZScoreClip):
        pass

    torch.manual_seed(0)
    model = TinyNet()
    opt = GradGuard(OPTIMIZERS["sgd_momentum"](model.parameters()), spike=MyClip(warmup=2), model=model)
    _train(model, opt, range(3))
    opt2 = GradGuard(OPTIMIZERS["sgd_momentum"](model.parameters()), spike=MyClip(warmup=2), model=model)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.spike._state, opt.spike._state)


def test_consolidate_state_dict_reaches_the_inner_optimizer():
    calls = []

    class Sharded(torch.optim.SGD):  # stands in for ZeroRedundancyOptimizer
        def consolidate_state_dict(self, to=0):
            calls.append(to)

    w = torch.nn.Parameter(torch.zeros(2))
    GradGuard(Sharded([w], lr=0.1)).consolidate_state_dict(to=1)
    assert calls == [1]
    plain = GradGuard(torch.optim.SGD([w], lr=0.1))
    # Lightning's Strategy.optimizer_state tests hasattr(optimizer, "consolidate_state_dict") to
    # treat an optimizer as ZeRO: a guard over anything else must not have the attribute.
    assert not hasattr(plain, "consolidate_state_dict")
    with pytest.raises(AttributeError, match="consolidate_state_dict"):
        plain.consolidate_state_dict()


def test_a_checkpoint_saved_after_add_param_group_before_a_step_loads():
    # The per-parameter totals grew only at the next step: a checkpoint saved in between held
    # one group's worth and no guard, the one that wrote it included, could load it.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = GradGuard(torch.optim.SGD(a.parameters(), lr=0.1), max_norm=1.0)
    for i in range(2):
        opt.zero_grad()
        a(_batch(i)[0][:, :4]).sum().backward()
        opt.step()
    opt.add_param_group({"params": list(b.parameters())})
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["gradguard"]["layer_nonfinite"].tolist() == [0, 0, 0, 0]
    opt.load_state_dict(saved)
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    opt2 = GradGuard(torch.optim.SGD(a2.parameters(), lr=0.1), max_norm=1.0)
    opt2.add_param_group({"params": list(b2.parameters())})
    opt2.load_state_dict(saved)
    for m, o in ((a, opt), (a2, opt2)):  # both go on: the new group's totals start at zero
        for i in range(2, 4):
            o.zero_grad()
            head = b if o is opt else b2
            head(m(_batch(i)[0][:, :4])).sum().backward()
            o.step()
    assert opt2.summary() == opt.summary()
    assert _tensors_equal(opt2.state_dict(), opt.state_dict())


def test_a_checkpoint_loaded_under_inference_mode_keeps_training():
    # A restore helper decorated with torch.inference_mode(): the guard's loaded state were
    # inference tensors, which the fallback's in-place updates refused at the next step.
    model, opt = _build("adamw_foreach", "zscore")
    _train(model, opt, range(4))
    saved = copy.deepcopy(opt.state_dict())  # torch's optimizers load their state without copying it
    model2, opt2 = _build("adamw_foreach", "zscore")
    with torch.inference_mode():
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(saved)
    state = opt2.guard_state_dict()
    tensors = [state["totals"], state["consecutive"], state["layer_nonfinite"], state["layer_max_norm"],
               opt2._state.counters, opt2.history._values]
    tensors += [v for v in state["spike"].values() if isinstance(v, torch.Tensor)]
    assert not any(t.is_inference() for t in tensors)
    _continue_alike((model, opt), (model2, opt2), range(4, 7))


def test_the_two_load_functions_name_each_others_input():
    model, opt = _build("sgd_momentum", None)
    _train(model, opt, range(2))
    with pytest.raises(ValueError, match=r"this is a guard_state_dict\(\).*load_guard_state_dict"):
        opt.load_state_dict(opt.guard_state_dict())
    with pytest.raises(ValueError, match=r"this is a full state_dict\(\).*load_state_dict"):
        opt.load_guard_state_dict(opt.state_dict())


def test_a_copied_lbfgs_guard_steps():
    # torch's Optimizer pickling drops what LBFGS.__init__ set: the copy failed at its first step.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = GradGuard(torch.optim.LBFGS([p], max_iter=2), max_norm=10.0)
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]

    def closure():
        clone.zero_grad()
        loss = (q * q).sum()
        loss.backward()
        return loss

    before = q.detach().clone()
    clone.step(closure)
    assert not torch.equal(q.detach(), before) and torch.equal(p.detach(), before)


@pytest.mark.parametrize("how", ["del_group", "pop_param"])
def test_per_parameter_totals_follow_parameters_removed_from_param_groups(how, decide_on):
    # The totals were kept by position and only grown: removing a group (or a parameter) from the
    # shared param_groups made every later step fail inside guard_decide ("must have n = 2
    # entries"), where the plain optimizer trains on.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    first, second = list(model[0].parameters()), list(model[1].parameters())
    opt = GradGuard(torch.optim.AdamW([{"params": first}, {"params": second}], lr=0.1), model=model)
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")  # 1.weight: one non-finite step
    opt.step()
    opt.zero_grad()
    if how == "del_group":
        del opt.param_groups[0]
        kept = ["1.weight", "1.bias"]
    else:
        opt.param_groups[1]["params"].pop(0)  # 1.weight
        kept = ["0.weight", "0.bias", "1.bias"]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # before the next step: for the parameters as they are now
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["gradguard"]["layer_nonfinite"].numel() == len(kept)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    s = opt.summary(k=5)
    assert sorted(w["name"] for w in s["worst_layers"]) == sorted(kept)
    bad = {w["name"]: w["nonfinite_steps"] for w in s["worst_layers"]}
    assert bad == {n: int(n == "1.weight") for n in kept}
    assert (s["steps"], s["skipped"]) == (3, 1)


def test_a_group_added_through_the_inner_optimizer_is_in_the_next_checkpoint():
    # guard.add_param_group grew the totals at once; a group added through the inner optimizer
    # (or param_groups.append) left them short until the next step, and a checkpoint saved in
    # between could not be loaded, by the guard that wrote it either.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    inner = torch.optim.SGD(a.parameters(), lr=0.1)
    opt = GradGuard(inner, max_norm=1.0)
    a(torch.randn(3, 4)).sum().backward()
    opt.step()
    inner.add_param_group({"params": list(b.parameters())})
    sd = opt.state_dict()
    assert sd["gradguard"]["layer_nonfinite"].tolist() == [0, 0, 0, 0]
    opt.load_state_dict(sd)


def test_copies_and_pickles_of_a_guard_keep_no_hooks():
    # As torch's optimizers: hooks are not copied. A deep copy's steps ran the original's hooks
    # (an EMA of the original model updated from the copy), and a lambda hook made torch.save fail.
    import copy

    p = torch.nn.Parameter(torch.zeros(3))
    opt = GradGuard(torch.optim.SGD([p], lr=1.0))
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: None)
    opt.add_step_hook(lambda g, r: calls.append("report"))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(opt), torch.load(buf, weights_only=False)):
        q = clone.param_groups[0]["params"][0]
        q.grad = torch.ones(3)
        clone.step()
        clone.state_dict()
        assert calls == [] and torch.equal(q, -torch.ones(3))
    p.grad = torch.ones(3)
    opt.step()
    assert sorted(calls) == ["post", "report"]  # the original keeps its own

"""gradguard/_host.py: the compiled host helpers of GradGuard.step() (csrc/cpu/host_helpers.cpp)
and their pure-Python versions give the same answers; each test runs on both where the
extension is loaded."""
from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
import torch

import gradguard
from gradguard import _host

IMPLS = ["python"] + (["compiled"] if _host._C is not None else [])


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(_host, "_C", None)
    return request.param


def _params(n=5, dtype=torch.float32):
    ps = [torch.nn.Parameter(torch.randn(3 + i, dtype=dtype)) for i in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def test_grad_stats_of_returns_the_grads_themselves_and_the_ops_results(impl):
    ps = _params()
    ps[2].grad[1] = float("nan")
    ps[4].grad[0] = float("inf")
    grads, acc, nan, inf, amax = _host.grad_stats_of(ps, 2.0, True)
    assert all(g is p.grad for g, p in zip(grads, ps))
    want = torch.ops.gradguard.multi_tensor_stats.default([p.grad for p in ps], 2.0)
    for got, w in zip((acc, nan, inf, amax), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)
    assert nan.tolist() == [0, 0, 1, 0, 0] and inf.tolist() == [0, 0, 0, 0, 1]


def test_grad_stats_of_owns_what_it_returns_and_leaks_nothing(impl):
    # Gradients made by a backward have no Python object until read: the call makes them. The
    # compiled call lends the op handles that own no reference (the returned list's objects keep
    # the tensors alive): a handle released as if owned would free a gradient still in use, one
    # kept would never let it go.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    ps = list(model.parameters())
    for _ in range(50):
        _host.grad_stats_of(ps, 2.0, True)
    grads, acc, *_ = _host.grad_stats_of(ps, 2.0, True)
    counts = [sys.getrefcount(g) for g in grads]
    for _ in range(50):
        _host.grad_stats_of(ps, 2.0, True)
    assert [sys.getrefcount(g) for g in grads] == counts
    want = [g.clone() for g in grads]
    refs = [weakref.ref(g) for g in grads]
    for p in ps:
        p.grad = None
    gc.collect()
    assert all(r() is not None for r in refs)  # held by the returned list alone now
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(acc, torch.ops.gradguard.multi_tensor_stats.default(want, 2.0)[0], rtol=0, atol=0)
    del grads, g
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("edit", ["clear grads", "empty the list", "replace items"])
def test_grad_stats_of_survives_python_run_by_a_collection_inside_the_call(impl, edit):
    # Allocating the returned objects can start a garbage collection, which runs Python
    # (gc.callbacks here; finalizers in real code) that may set p.grad = None or edit the list
    # while the call is reading it. The compiled call holds the collector off while it reads:
    # before, these crashed (a freed gradient, an index past the emptied list). The Python
    # version reads the list as any comprehension does (an edit mid-read is seen).
    if impl == "python" and edit != "clear grads":
        pytest.skip("a list comprehension sees the edit: Python's own semantics")
    ps = [torch.nn.Parameter(torch.randn(64)) for _ in range(300)]
    sum((p * p).sum() for p in ps).backward()  # gradients with no Python object yet: not read here
    want = torch.ops.gradguard.multi_tensor_stats.default([2 * p.detach() for p in ps], 2.0)
    armed = [True]

    def callback(phase, info):
        if not (armed[0] and phase == "start"):
            return
        armed[0] = False
        if edit == "clear grads":
            for p in ps:
                p.grad = None
            callback.junk = [torch.full((64,), 7.0) for _ in range(50)]  # reuses freed memory
            for p in ps:
                p.grad = torch.full((64,), 3.0)
        elif edit == "empty the list":
            ps_view.clear()
        else:
            ps_view[:] = [12345] * len(ps_view)

    ps_view = list(ps)
    threshold = gc.get_threshold()
    gc.collect()
    gc.callbacks.append(callback)
    try:
        gc.set_threshold(20)
        got = _host.grad_stats_of(ps_view, 2.0, True)
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*threshold)
    assert not armed[0], "no collection ran inside the call: the test tests nothing"
    grads, acc, *_ = got
    assert len(grads) == len(ps)
    # Either the gradients as they were when read, or (Python path: the collection ran between
    # reads) the new ones; never freed memory.
    old = [torch.equal(g, 2 * p.detach()) for g, p in zip(grads, ps)]
    new = [bool((g == 3.0).all()) for g in grads]
    assert all(a or b for a, b in zip(old, new))
    if all(old):
        torch.testing.assert_close(acc, want[0], rtol=0, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
def test_grad_stats_of_norm_types_and_dtypes(impl, p):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        ps = _params(4, dtype)
        _, acc, *_ = _host.grad_stats_of(ps, p, True)
        want = torch.ops.gradguard.multi_tensor_stats.default([q.grad for q in ps], p)[0]
        torch.testing.assert_close(acc, want, rtol=0, atol=0)


def test_grad_stats_of_missing_grad_takes_the_general_path(impl):
    ps = _params()
    ps[3].grad = None
    try:
        got = _host.grad_stats_of(ps, 2.0, True)
    except (TypeError, RuntimeError):  # the Python path: the op refuses the None (which: by torch version)
        got = None
    assert got is None


def test_grad_stats_of_refuses_what_the_op_refuses(impl):
    ps = _params()
    ps[1].grad = ps[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="strided"):
        _host.grad_stats_of(ps, 2.0, True)
    with pytest.raises((RuntimeError, ValueError), match="must not be empty"):
        _host.grad_stats_of([], 2.0, True)


@pytest.mark.skipif(_host._C is None, reason="the compiled helpers are not loaded")
def test_compiled_helpers_refuse_non_tensors_and_non_lists():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(TypeError, match="item 1 is int, not a tensor"):
        _host._C.grad_stats_of([p, 3], 2.0)
    with pytest.raises(TypeError, match="expected a list, got tuple"):
        _host._C.grad_stats_of((torch.ones(2),), 2.0)
    marks = _host._C.clear_marks_new()
    with pytest.raises(TypeError, match="not a tensor"):
        _host._C.clear_marks_set(marks, [torch.ones(2), "x"])
    with pytest.raises(ValueError):  # not a marks capsule
        _host._C.clear_marks_unchanged(object(), [torch.ones(2)])


def test_clear_marks_same_tensors_one_backward_is_unchanged(impl):
    grads = [torch.zeros(3) for _ in range(4)]
    marks = _host.ClearMarks()
    assert not marks.unchanged(grads)  # nothing remembered yet
    marks.set(grads)
    assert marks.unchanged(grads)
    grads[1].add_(1.0)  # one backward accumulating into it: version + 1
    assert marks.unchanged(grads)
    assert marks.unchanged(list(reversed(grads)))  # the order does not matter
    assert marks.unchanged([grads[0], grads[2], grads[3]])  # a subset that holds the anchors
    assert not marks.unchanged(grads[:3])  # the last remembered one (an anchor) is missing
    assert not marks.unchanged(grads[1:])  # the first one is missing
    assert not marks.unchanged([])


def test_clear_marks_in_place_clear_or_new_tensor_is_changed(impl):
    grads = [torch.zeros(3) for _ in range(4)]
    marks = _host.ClearMarks()
    marks.set(grads)
    grads[2].zero_()
    grads[2].add_(1.0)  # cleared in place, then one backward: version + 2
    assert not marks.unchanged(grads)
    marks.set(grads)
    assert marks.unchanged(grads)
    assert not marks.unchanged(grads[:3] + [torch.zeros(3)])  # a new tensor (set_to_none)


def test_clear_marks_skip_none_and_never_confuse_a_new_tensor_with_a_freed_one(impl):
    grads = [torch.zeros(3), None, torch.zeros(3), torch.zeros(3)]
    marks = _host.ClearMarks()
    marks.set(grads)
    assert marks.unchanged([grads[0], grads[2], grads[3]])
    # A clear with set_to_none: every marked tensor freed, new ones of the same size made, which
    # may reuse the memory of the old Python objects and TensorImpls. They are still new tensors.
    del grads
    gc.collect()
    for _ in range(20):
        fresh = [torch.zeros(3) for _ in range(3)]
        assert not marks.unchanged(fresh)
    # Only the middle gradient cleared (replaced), anchors kept: nothing is wrongly missed when
    # the new tensor lands elsewhere; when it reuses the freed address the compiled version may
    # take it for the old one, and then the anchors' parameters really did accumulate.
    grads = [torch.zeros(3), torch.zeros(3), torch.zeros(3)]
    marks.set(grads)
    grads[1] = torch.ones(3)  # made before the old one is freed: not at its address
    assert not marks.unchanged(grads)


def test_guard_with_a_parameter_subclass_reads_grads_in_python():
    class Tagged(torch.nn.Parameter):
        pass

    ps = [Tagged(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    guard = gradguard.GradGuard(torch.optim.SGD(ps, lr=0.1), max_norm=1.0)
    for p in ps:
        p.grad = torch.full_like(p, 2.0)
    guard.step()
    assert guard._plan.plain is False
    assert torch.allclose(ps[0].detach(), torch.full((3,), 1.0 - 0.1 * 2.0 / (20 ** 0.5)))
    assert guard.last.as_dict()["skipped"] is False


def test_guard_hygiene_warns_the_same_on_both_paths(impl):
    ps = _params(3)
    guard = gradguard.GradGuard(torch.optim.SGD(ps, lr=0.0))
    with pytest.warns(gradguard.HygieneWarning, match="twice with no zero_grad"):
        for _ in range(3):
            for p in ps:
                p.grad.add_(1.0)  # a backward accumulating, never cleared
            guard.step()


@pytest.mark.skipif(_host._C is None, reason="the compiled helpers are not loaded")
def test_plain_stats_takes_only_the_plain_common_case():
    class Sub(torch.Tensor):
        pass

    a, b = torch.randn(5), torch.randn(3, 4).t()
    assert _host.plain_stats([a, b], 2.0) is not None
    assert _host.plain_stats((a, b), 2.0) is not None  # a tuple too
    assert _host.plain_stats([torch.nn.Parameter(a).detach(), b], 2.0) is not None
    refused = {
        "a generator": (t for t in (a, b)),
        "no tensors": [],
        "two dtypes": [a, b.double()],
        "two devices": [a, torch.empty(3, device="meta")],
        "requires grad": [a, torch.nn.Parameter(b.contiguous())],
        "a subclass": [a, b.as_subclass(Sub)],
        "sparse": [a, b.contiguous().to_sparse()],
        "complex": [torch.randn(3, dtype=torch.complex64)],
        "integer": [torch.ones(3, dtype=torch.int64)],
        "not a tensor": [a, 3.0],
    }
    for what, tensors in refused.items():
        assert _host.plain_stats(tensors, 2.0) is None, what
        assert _host.plain_grad_stats(tensors, 2.0) is None, what
    assert _host.plain_grad_stats((a, b), 2.0) is not None


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
def test_grad_stats_and_all_finite_equal_on_both_paths(monkeypatch, p):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        ts = [torch.randn(300, dtype=dtype), torch.randn(7, 9, dtype=dtype).t(), torch.zeros(0, dtype=dtype)]
        ts[0][4] = float("nan")
        ts[1][2, 3] = float("-inf")
        fast, fast_ok = gradguard.grad_stats(ts, p), gradguard.all_finite(ts[1:])
        with monkeypatch.context() as m:
            m.setattr(_host, "_C", None)
            slow, slow_ok = gradguard.grad_stats(ts, p), gradguard.all_finite(ts[1:])
        for f, s in zip(fast, slow):
            assert f.dtype == s.dtype and f.device == s.device
            torch.testing.assert_close(f, s, rtol=0, atol=0, equal_nan=True)
        assert bool(fast_ok) is bool(slow_ok) is False
        # Finite lists too: a total above the result dtype's range (inf and flagged; float16's
        # results are float32, which holds it), and an ordinary one.
        big = torch.finfo(dtype).max / 4
        for ts in ([torch.full((40,), big, dtype=dtype), torch.randn(5, dtype=dtype)], [torch.randn(33, dtype=dtype)]):
            fast = gradguard.grad_stats(ts, p)
            with monkeypatch.context() as m:
                m.setattr(_host, "_C", None)
                slow = gradguard.grad_stats(ts, p)
            for f, s in zip(fast, slow):
                assert f.dtype == s.dtype and f.device == s.device
                torch.testing.assert_close(f, s, rtol=0, atol=0, equal_nan=True)


def test_same_params_is_identity_in_order(impl):
    a, b, c = object(), object(), object()
    same = _host.same_params

    def groups(*lists):
        return [{"params": l, "lr": 0.1} for l in lists]

    assert same(groups([a, b], (c,)), [a, b, c])
    assert same((), []) and same(groups([]), [])
    assert not same(groups([a, b], [c]), [a, c, b])          # order
    assert not same(groups([a, b]), [a, b, c])               # shorter
    assert not same(groups([a, b], [c, a]), [a, b, c])       # longer
    x, y = [1000], [1000]
    assert x == y and not same(groups([x]), [y])             # equal is not the same object
    assert not same(groups({a}), [a])                        # a set is no parameter list
    assert not same([{"lr": 0.1}], [])                       # a group without params
    assert not same([[a]], [a])                              # a list is no group

    class Group(dict):
        pass

    assert same([Group(params=[a])], [a])                    # a dict subclass
    assert same(iter(groups([a, b])), [a, b])                # any iterable of groups
    assert not same([3], [])                                 # a group that is no mapping

    class Missing(dict):
        def __missing__(self, key):
            raise RuntimeError("not a KeyError")

    with pytest.raises(RuntimeError, match="not a KeyError"):  # other errors propagate
        same([Missing(lr=0.1)], [])


class _CollidesWithParams:
    """A dict key whose hash equals that of "params": a lookup of "params" then calls its __eq__,
    which here empties the flat list and the group list (Python run inside the compiled call)."""

    def __init__(self, victims):
        self.victims = victims
        self.armed = False  # inserting "params" after it compares them too

    def __hash__(self):
        return hash("params")

    def __eq__(self, other):
        if self.armed:
            for v in self.victims:
                v.clear()
        return False


def test_same_params_survives_python_run_by_the_lookup(impl):
    a, b = object(), object()
    flat = [a, b]
    outer = [{}]
    group = outer[0]
    key = _CollidesWithParams([flat, outer])
    group[key] = 1  # first in the dict: the lookup meets it first
    group["params"] = [a, b]
    key.armed = True
    assert _host.same_params(outer, flat) is False
    assert flat == [] and outer == []


@pytest.mark.skipif(_host._C is None, reason="the compiled helpers are not loaded")
def test_same_params_refuses_what_is_not_a_list():
    with pytest.raises(TypeError, match="expected a list, got tuple"):
        _host._C.same_params([{"params": [1]}], (1,))
    with pytest.raises(TypeError, match="the parameter groups must be iterable"):
        _host._C.same_params(3, [1])


def test_device_type_answers_for_the_device_asked_about():
    # _host.device_type remembers the last device object it read: another object, of another
    # type or not, must be read afresh (GradGuard asks about its plan's device at every step).
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert [_host.device_type(d) for d in (cpu, cpu, meta, meta, cpu, torch.device("meta"))] == \
        ["cpu", "cpu", "meta", "meta", "cpu", "meta"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.float16,
                                   torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int16, torch.int8])
def test_cpu_value_reads_the_element_a_view_points_at(dtype):
    # Read from memory for the common dtypes (no aten::item in the step): the view's own element,
    # not its storage's first one.
    from gradguard import _host  # noqa: PLC0415

    buf = torch.tensor([1.0, -2.0, 3.0, 0.5]).to(dtype)
    assert _host.cpu_value(buf[2]) == 3.0 and _host.cpu_value(buf[1:2].reshape(())) == -2.0
    assert _host.cpu_value(buf.reshape(2, 2)[1, 1]) == float(buf[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_cpu_value_decodes_16_and_8_bit_floats_as_float_does(dtype):
    # float16, bfloat16 and the float8 formats are decoded from their bits (no aten::item):
    # every special value too.
    from gradguard import _host  # noqa: PLC0415

    if dtype.itemsize == 1:  # every one of the 256 values
        vals = torch.arange(256, dtype=torch.uint8).view(dtype)
        got, want = [_host.cpu_value(v) for v in vals], [float(v) for v in vals]
        assert [g != g for g in got] == [w != w for w in want]
        assert [(g, math.copysign(1.0, g)) for g, w in zip(got, want) if w == w] == \
            [(w, math.copysign(1.0, w)) for w in want if w == w]
        return

    info = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, 1.0, -1.5, info.max, -info.max, info.tiny, info.tiny / 4, info.eps,
                         float("inf"), float("-inf"), float("nan"), 3.14159, 65504.0, 1e-3]).to(dtype)
    got = [_host.cpu_value(v) for v in vals]
    want = [float(v) for v in vals]
    assert [g != g for g in got] == [w != w for w in want]
    assert [(g, math.copysign(1.0, g)) for g, w in zip(got, want) if w == w] == \
        [(w, math.copysign(1.0, w)) for w in want if w == w]

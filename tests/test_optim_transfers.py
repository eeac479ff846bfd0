"""Every host view of a StepReport, summary(), and the one read a non-fused step needs are a
single device-to-host transfer each (issue 15): on a GPU every transfer is a sync."""
from __future__ import annotations

import contextlib
import math
import os
import sys

import pytest
import torch

from gradguard import GradGuard
from tests.optim_util import make_params, make_grads, set_grads

_READS = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def count_reads(monkeypatch, inner=None):
    """Counts the Tensor methods that bring values to the host, outside `inner.step()` and
    outside the pure-PyTorch kernels (gradguard/reference: CPU-only code inside a dispatched op,
    which a device kernel replaces)."""
    kernels = os.path.join("gradguard", "reference") + os.sep
    count = [0]
    paused = [False]
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            if not paused[0] and kernels not in sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    if inner is not None:
        step = inner.step

        def quiet_step(*args, **kwargs):
            paused[0] = True
            try:
                return step(*args, **kwargs)
            finally:
                paused[0] = False

        monkeypatch.setattr(inner, "step", quiet_step)
    try:
        yield count
    finally:
        monkeypatch.undo()


def _guard_after_bad_step(**kwargs):
    params = make_params()
    opt = GradGuard(torch.optim.SGD(params, lr=0.1), max_norm=0.5, hygiene=False, names=["a", "b", "c"], **kwargs)
    grads = make_grads(0)
    grads[1][2] = math.nan
    grads[2][0, 0, 0] = math.inf
    set_grads(params, grads)
    opt.step()
    return opt, grads


def test_every_report_view_is_one_transfer(monkeypatch):
    opt, grads = _guard_after_bad_step()
    rep = opt.last
    with count_reads(monkeypatch) as reads:
        d = rep.as_dict(layers=True)
        bad = rep.nonfinite_layers
        worst = rep.worst_layers(2)
    assert reads[0] == 1
    assert bad == ["b", "c"] and d["skipped"] and d["found_inf"] and not d["clipped"]
    assert d["layers"]["b"]["nan"] == 1 and d["layers"]["c"]["inf"] == 1 and d["layers"]["a"]["nan"] == 0
    ref = torch.linalg.vector_norm(grads[0].double()).item()
    assert d["layers"]["a"]["norm"] == pytest.approx(ref, rel=1e-6)
    assert d["layers"]["a"]["amax"] == pytest.approx(grads[0].double().abs().max().item(), rel=1e-6)
    assert math.isnan(d["total_norm"]) or math.isinf(d["total_norm"])
    assert [n for n, _ in worst] == ["b", "c"]
    assert isinstance(d["layers"]["b"]["nan"], int) and isinstance(d["clip_coef"], float)


def test_summary_is_one_transfer(monkeypatch):
    opt, grads = _guard_after_bad_step()
    with count_reads(monkeypatch) as reads:
        s = opt.summary(k=3)
    assert reads[0] == 1
    assert (s["steps"], s["skipped"], s["clipped"], s["nonfinite_steps"], s["consecutive_skips"]) == (1, 1, 0, 1, 1)
    assert [w["name"] for w in s["worst_layers"][:2]] == ["b", "c"]
    assert all(isinstance(w["nonfinite_steps"], int) for w in s["worst_layers"])
    a = s["worst_layers"][2]
    assert (a["name"], a["nonfinite_steps"]) == ("a", 0)
    assert a["max_norm"] == pytest.approx(torch.linalg.vector_norm(grads[0].double()).item(), rel=1e-6)


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_non_fused_step_reads_once(monkeypatch, bad, clip):
    params = make_params()
    inner = torch.optim.SGD(params, lr=0.1, foreach=True)
    opt = GradGuard(inner, max_norm=clip, hygiene=False)
    grads = make_grads(0)
    if bad:
        grads[0][0, 0] = math.nan
    set_grads(params, grads)
    opt.step()  # lazily created state
    set_grads(params, grads)
    with count_reads(monkeypatch, inner) as reads:
        opt.step()
    assert reads[0] == 1


def test_device_decided_fused_step_reads_nothing(monkeypatch):
    params = make_params()
    inner = torch.optim.AdamW(params, lr=1e-2, fused=True)
    opt = GradGuard(inner, max_norm=0.5, hygiene=False)
    opt._decide_on_host_on_cpu = False
    set_grads(params, make_grads(0))
    opt.step()
    set_grads(params, make_grads(1))
    with count_reads(monkeypatch, inner) as reads:
        opt.step()
    assert reads[0] == 0


def test_alternating_gradless_parameters_build_each_index_once(monkeypatch):
    # The index that places the present gradients among all parameters was cached for one
    # pattern only: parameters without a gradient on alternate steps (MoE experts that got no
    # tokens) rebuilt it every step, on a GPU a blocking host-to-device copy each time.
    import gradguard.optim as optim_mod
    built = []
    real = optim_mod._index_tensor
    monkeypatch.setattr(optim_mod, "_index_tensor", lambda present, device: built.append(list(present)) or
                        real(present, device))
    params = make_params()
    opt = GradGuard(torch.optim.AdamW(params, lr=1e-2, fused=True), max_norm=0.5, hygiene=False)
    opt._decide_on_host_on_cpu = False
    for step in range(8):
        set_grads(params, make_grads(step))
        params[1 + step % 2].grad = None
        opt.step()
    assert sorted(map(tuple, built)) == sorted({tuple(b) for b in built}) and len(built) == 2, built
    assert opt.last.names == [n for i, n in enumerate(opt._names(params)) if i != 2]  # step 7: param 2 gradless


def test_a_cpu_max_norm_tensor_is_filled_on_another_device_not_copied(monkeypatch):
    # (On a GPU .to() from pageable memory is a blocking copy: a sync every step. The meta
    # device stands in for it here; tests/test_cuda.py steps a guard with one on a GPU.)
    from gradguard.stats import limit_on
    t = torch.tensor(2.5, dtype=torch.float64)
    monkeypatch.setattr(torch.Tensor, "to", lambda *a, **k: pytest.fail("copied with .to()"))
    got = limit_on(t, torch.device("meta"))
    assert got.device.type == "meta" and got.dtype == torch.float64 and got.shape == ()
    assert limit_on(t, torch.device("cpu")) is t


def test_the_layout_cache_keeps_the_most_recently_used_sets(monkeypatch):
    # It evicted the oldest inserted set, however recently used: a set used every other step
    # among rare ones was rebuilt every 16 new sets (123 times in 2,000 of its steps).
    import gradguard.optim as optim_mod
    built = []
    real = optim_mod._index_tensor
    monkeypatch.setattr(optim_mod, "_index_tensor", lambda present, device: built.append(tuple(present)) or
                        real(present, device))
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(40)]
    opt = GradGuard(torch.optim.SGD(params, lr=0.1), hygiene=False)

    def step(missing):
        for i, q in enumerate(params):
            q.grad = None if i == missing else torch.ones(2)
        opt.step()

    for k in range(1, 4 * optim_mod._LAYOUTS_KEPT):
        step(0)      # the common set: built once
        step(k)      # a new rare set each time
    assert built.count(tuple(range(1, 40))) == 1

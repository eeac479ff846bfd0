"""A whole guarded step captured in a CUDA graph and replayed (issue 15).

GradGuard.step() on a CUDA device with a fused optimizer decides on the device (stats, decide,
the fused step with found_inf/grad_scale): no host read, nothing allocated per step once warm,
so torch.cuda.graph can capture it. A foreach or for-loop optimizer (capturable=True) is stepped
whatever the decision under a capture and rolled back on the device on a skipped replay (the
same path runs on the CPU in tests/test_capture_rollback.py). Replays must equal eager steps,
including a replay whose gradients hold a NaN and whose step is therefore skipped. These run
where a GPU exists (benchmarks/gpu_check.sh); CI compiles the kernels they need.
"""
from __future__ import annotations

import math

import pytest
import torch

import gradguard

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(64, 32), (32,), (16, 64), (16,)]


def _grad_sequence(steps: int, nan_at: int):
    g = torch.Generator().manual_seed(0)
    seq = []
    for k in range(steps):
        grads = [torch.randn(s, generator=g) * (5.0 if k % 3 == 0 else 0.1) for s in SHAPES]
        if k == nan_at:
            grads[2][3, 7] = math.nan
        seq.append([t.cuda() for t in grads])
    return seq


def _setup(optim_kwargs, guard_kwargs):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, capturable=True, **optim_kwargs)
    return params, gradguard.GradGuard(opt, **guard_kwargs)


def _load(params, grads):
    for p, g in zip(params, grads):
        p.grad.copy_(g)  # the graph reads the grads' static memory


@pytest.mark.parametrize("guard_kwargs", [dict(max_norm=1.0), dict(max_norm=1.0, spike=gradguard.ZScoreClip(warmup=2)),
                                          dict(on_nonfinite="zero", max_norm=1.0), dict()],
                         ids=["clip", "clip+zscore", "zero", "plain"])
@pytest.mark.parametrize("optim_kwargs", [dict(fused=True), dict(foreach=True), dict(foreach=False)],
                         ids=["fused", "foreach", "for-loop"])
def test_captured_step_replays_like_eager_steps(optim_kwargs, guard_kwargs):
    warm, steps, nan_at = 3, 8, 5
    seq = _grad_sequence(warm + steps, warm + nan_at)
    # A policy of its own for each guard (the parametrized one is one object across the tests).
    def kw():
        return {**guard_kwargs, "spike": gradguard.ZScoreClip(warmup=2)} if "spike" in guard_kwargs else guard_kwargs

    eager_params, eager = _setup(optim_kwargs, kw())
    graph_params, guard = _setup(optim_kwargs, kw())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up creates the guard's and AdamW's state outside the graph
        for k in range(warm):
            _load(graph_params, seq[k])
            guard.step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(warm):
        _load(eager_params, seq[k])
        eager.step()

    graph = torch.cuda.CUDAGraph()
    _load(graph_params, seq[warm])
    with torch.cuda.graph(graph):
        guard.step()
    # Capture records the step without running it: replay it for the same gradients.
    for k in range(warm, warm + steps):
        _load(graph_params, seq[k])
        graph.replay()
        _load(eager_params, seq[k])
        eager.step()
        torch.cuda.synchronize()
        for a, b in zip(graph_params, eager_params):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(graph_params, eager_params):
            sa, sb = guard.optimizer.state[a], eager.optimizer.state[b]
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)
        skipped_now = k == warm + nan_at and guard_kwargs.get("on_nonfinite", "skip") == "skip"
        assert bool(guard.last.skipped) == skipped_now
    # An eager step after the replays is numbered after them (the host counts no step once a
    # guard was captured: the number comes from the device).
    _load(graph_params, seq[warm])
    guard.step()
    _load(eager_params, seq[warm])
    eager.step()
    assert guard.last.step == eager.last.step == warm + steps + 1
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The device-side counters advanced on every replay, as the eager ones did.
    assert torch.equal(guard._state.counters, eager._state.counters)
    assert torch.equal(guard._state.layer_nonfinite, eager._state.layer_nonfinite)
    # The host catches up with the replays when it reads: history, summary and checkpoint.
    hg, he = guard.history.as_dict(), eager.history.as_dict()
    assert {k: v for k, v in hg.items() if k != "total_norm"} == {k: v for k, v in he.items() if k != "total_norm"}
    assert str(hg["total_norm"]) == str(he["total_norm"])  # NaN on the bad step
    assert guard.summary() == eager.summary()
    assert guard.state_dict()["gradguard"]["steps"] == eager.state_dict()["gradguard"]["steps"] == warm + steps + 1


@pytest.mark.parametrize("optim_kwargs", [dict(fused=True), dict(foreach=True)], ids=["fused", "foreach"])
def test_a_skipped_replay_leaves_params_and_state_bit_identical(optim_kwargs):
    params, guard = _setup(optim_kwargs, dict(max_norm=1.0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            _load(params, [torch.randn(s, device="cuda") for s in SHAPES])
            guard.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        guard.step()
    bad = [torch.randn(s, device="cuda") for s in SHAPES]
    bad[0][0, 0] = math.inf
    _load(params, bad)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in guard.optimizer.state[p].items()} for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert bool(guard.last.skipped) and bool(guard.last.found_inf == 1)
    for p, b, s in zip(params, before, state):
        assert torch.equal(p, b)
        for k, v in s.items():
            assert torch.equal(guard.optimizer.state[p][k], v)


def test_a_step_that_must_read_on_the_host_is_refused_with_a_clear_error_under_capture():
    # on_nonfinite="raise" has to raise on the host; a graph cannot. The guard says so instead of
    # failing inside the capture.
    params, guard = _setup(dict(foreach=True), dict(max_norm=1.0, on_nonfinite="raise"))
    guard.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="on_nonfinite='raise'.*capture"):
        with torch.cuda.graph(graph):
            guard.step()


def test_an_optimizer_keeping_state_on_the_cpu_is_refused_under_capture():
    # Adagrad without a capturable mode keeps its step counters on the CPU: a skipped replay
    # could not restore them, and the guard says so.
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    for p in params:
        p.grad = torch.zeros_like(p)
    guard = gradguard.GradGuard(torch.optim.Adagrad(params, lr=0.1, foreach=True), max_norm=1.0)
    guard.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="must be on cuda"):
        with torch.cuda.graph(graph):
            guard.step()


def test_parameters_with_gradients_first_seen_under_capture_are_refused_with_a_clear_error():
    # The index of the parameters that have a gradient is copied from the host when a set is new;
    # under a capture that copy (from pageable memory, before) failed with CUDA's own error.
    params, guard = _setup(dict(fused=True), dict(max_norm=1.0))
    for _ in range(2):
        guard.step()  # every parameter has a gradient: warm
    params[1].grad = None
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eager warm-up step in which the same parameters have gradients"):
        with torch.cuda.graph(graph):
            guard.step()

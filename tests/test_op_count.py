"""How many ops GradGuard.step() dispatches beyond its inner optimizer's own (issue 15), counted
with torch.profiler as the bench does: top-level aten/gradguard ops (those under no other such
op), no-op `aten::to` left out, a `tolist()` read counted as one."""
from __future__ import annotations

import pytest
import torch

from gradguard.bench.optim_cases import OP_COUNT_TARGET, OP_PATHS, guard_op_counts, top_level_ops

@pytest.fixture(scope="module")
def counts():
    return guard_op_counts(52)


def test_counter_sees_clip_grad_norm_as_pytorch_dispatches_it():
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(20)]
    for p in params:
        p.grad = torch.randn(4, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True)
    ops = top_level_ops(prof.events())
    # One norm launch and one clip launch for all 20 tensors, not one per tensor.
    assert ops.count("aten::_foreach_norm") == 1 and ops.count("aten::_foreach_mul_") == 1
    assert "aten::linalg_vector_norm" in ops and len(ops) < 20


def test_every_path_is_counted(counts):
    assert set(OP_PATHS) <= set(counts)
    assert all(counts[p] for p in OP_PATHS)
    assert counts["GradScaler + SGD"].count("gradguard::multi_tensor_stats") == 1
    # The inner step's own ops are not the guard's: no fused kernel among the guard's ops.
    assert not any("fused" in op or op.startswith("aten::_foreach_add") for op in counts[OP_PATHS[0]])


def test_op_count_does_not_grow_with_tensor_count(counts):
    more = guard_op_counts(200)
    assert {p: len(more[p]) for p in OP_PATHS} == {p: len(counts[p]) for p in OP_PATHS}


@pytest.mark.parametrize("path", OP_PATHS)
def test_op_count_target(counts, path):
    # Before the guard_decide op these paths dispatched 66-103 ops.
    ops = counts[path]
    assert len(ops) <= OP_COUNT_TARGET, ops
    assert ops[:2] == ["gradguard::multi_tensor_stats", "gradguard::guard_decide"], ops


@pytest.mark.parametrize("path", [2, 5, 6])
def test_the_sgd_rows_count_a_step_that_scales(counts, path):
    # These rows ran on gradients an earlier row had clipped to max_norm: whether they clipped
    # again was a rounding (4 ops on the extension, 3 on the reference), not the clipping step
    # their labels say.
    assert counts[OP_PATHS[path]][-1] == "gradguard::maybe_scale_", counts[OP_PATHS[path]]


def test_device_decided_fused_step_is_two_ops_and_no_read(counts):
    # The GPU path: stats, decide, then the fused kernel takes found_inf/grad_scale; no transfer.
    assert counts[OP_PATHS[0]] == ["gradguard::multi_tensor_stats", "gradguard::guard_decide"]


def test_host_overhead_table_measures_every_path_and_size():
    from gradguard.bench.optim_cases import HOST_TARGET_US, host_overhead_table

    threads = torch.get_num_threads()
    tab = host_overhead_table(repeats=3)
    assert torch.get_num_threads() == threads
    # fused device-decided, SGD one read, SGD with the default hygiene check and new grads
    assert len(tab.rows) == 3 * len(HOST_TARGET_US) and len(tab.checks) == len(tab.rows)
    for n in HOST_TARGET_US:
        assert sum(f", {n} tensors:" in c for c in tab.checks) == 3
    assert sum("hygiene=True" in c for c in tab.checks) == len(HOST_TARGET_US)


@pytest.mark.parametrize("decide", ["host", "device"])
def test_float64_fused_clip_is_one_scaling_op(decide):
    """float64 grads on a fused optimizer are clipped by the float64 multiplier in one scaling op
    of their own (grad_scale is float32), still within the target."""
    from gradguard import GradGuard
    from gradguard.bench.optim_cases import guard_ops

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 8, generator=g, dtype=torch.float64)) for _ in range(52)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    guard = GradGuard(torch.optim.AdamW(params, lr=1e-3, fused=True), max_norm=1e-3, hygiene=False)
    guard._decide_on_host_on_cpu = decide == "host"
    ops = guard_ops(guard)
    assert len(ops) <= OP_COUNT_TARGET, ops
    assert ops[:2] == ["gradguard::multi_tensor_stats", "gradguard::guard_decide"], ops
    assert ops.count("gradguard::maybe_scale_") == 1, ops
    assert len(ops) == (4 if decide == "host" else 3), ops  # the host path's one read


@pytest.mark.parametrize("decided_on", ["device", "host"])
def test_grad_scaler_clipped_fused_step_adds_one_scaling_op(decided_on):
    # Under GradScaler with clipping, a fused step is preceded by guard_decide's pre_scale (1 but
    # where loss_scale / clip_coef is past float32: then the clip coefficient), applied with one
    # maybe_scale_ that writes nothing at 1; the count stays within the target.
    from gradguard import GradGuard
    from gradguard.bench.optim_cases import _op_params, guard_ops

    params = _op_params(52)
    grads = [p.grad.clone() for p in params]
    guard = GradGuard(torch.optim.AdamW(params, lr=1e-3, fused=True), max_norm=1e-3, hygiene=False)
    guard._decide_on_host_on_cpu = decided_on == "host"
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)

    def scaled():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        scaler.scale(torch.ones(()))
        scaler.step(guard)
        scaler.update()

    ops = guard_ops(guard, scaled)
    assert len(ops) <= OP_COUNT_TARGET, ops
    assert ops[:2] == ["gradguard::multi_tensor_stats", "gradguard::guard_decide"] and ops[-1] == "gradguard::maybe_scale_", ops
    assert len(ops) == (3 if decided_on == "device" else 4), ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.float16,
                                   torch.bfloat16, torch.int16, torch.int8, torch.uint8, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_a_cpu_tensor_max_norm_costs_no_op_of_its_own(dtype):
    # The step checks a CPU tensor limit's value (a schedule may have made it negative); read by
    # float() that was an aten::item, and the clipping SGD step 5 ops, one over the bound. An
    # integer or 16-bit one was also converted to float64 for the decision every step (one op).
    from gradguard import GradGuard  # noqa: PLC0415
    from gradguard.bench.optim_cases import _op_params, guard_ops  # noqa: PLC0415

    ops = []
    for limit in (1e-3, torch.tensor(1e-3, dtype=dtype)):
        params = _op_params(8)
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        ops.append(guard_ops(GradGuard(torch.optim.SGD(params, lr=1e-9), max_norm=limit, hygiene=False)))
    assert ops[1] == ops[0] and len(ops[1]) <= OP_COUNT_TARGET and "gradguard::maybe_scale_" in ops[1]

"""Norms of finite gradients whose naive sum of |x|^p overflows (issue 10 item 1), the shard merge,
float64-accurate sums (item 8), the bounded-memory reference (item 9) and meta tensors (item 4).

Run on both kernel paths: the suite runs once with the extension and once with
GRADGUARD_DISABLE_EXT=1; `stats_paths()` also calls the reference kernel directly."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import gradguard
from conftest import DEVICES, FLOAT_DTYPES, stats_paths
from gradguard import reference
from gradguard.optim import GradGuard
from gradguard.spike import ZScoreClip
from gradguard.stats import merge_shard_stats

INF = math.inf


def _true_norm(values, p):
    """The p-norm in exact-enough float64 math, scaled by the max like BLAS nrm2."""
    a = [abs(float(v)) for v in values]
    m = max(a)
    if math.isinf(p):
        return m
    return m * sum((x / m) ** p for x in a) ** (1.0 / p)


@pytest.mark.parametrize("dtype, value", [(torch.float64, 1e200), (torch.float64, 1e-200),
                                          (torch.float32, 8e37), (torch.float32, 1e-44),
                                          (torch.bfloat16, 8e37), (torch.float16, 6e4)])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, INF])
@pytest.mark.parametrize("device", DEVICES)
def test_finite_norm_of_large_and_tiny_values(dtype, value, p, device):
    """4 elements of `value`: the norm is representable in the result dtype, so it is returned
    exactly, and the step is not flagged."""
    t = torch.full((4,), value, dtype=dtype, device=device)
    v = float(t[0])
    expected = v * 4 ** (1.0 / p) if not math.isinf(p) else v
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = gradguard.grad_stats([t], norm_type=p)
    assert s.found_inf.item() == 0.0
    torch.testing.assert_close(s.total_norm.cpu(), torch.tensor(expected, dtype=out_dtype), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.norms.cpu(), torch.tensor([expected], dtype=out_dtype), rtol=1e-12, atol=0)


def _decimal_norm(parts, p):
    """The p-norm of len(v) elements of each v in `parts` ((value, count) pairs), in 60-digit
    decimal arithmetic: float64's own power overflows on the way (2000^100)."""
    import decimal

    with decimal.localcontext(decimal.Context(prec=60, Emax=10**6, Emin=-10**6)):
        total = sum(count * decimal.Decimal(v) ** decimal.Decimal(p) for v, count in parts)
        return float(total ** (1 / decimal.Decimal(p)))


@pytest.mark.parametrize("p", [0.01, 0.0095])
@pytest.mark.parametrize("device", DEVICES)
def test_small_p_on_tiny_float64_values(p, device):
    """A p far below 1: amax * acc^(1/p) overflowed in acc^(1/p) (2000^100) although the norm
    (1.3e130 at p = 0.01) is well inside float64's range; the norm came out inf, the step was
    flagged and clip_grad_norm_ skipped its clip where torch clips."""
    parts = [(1e-200, 2000), (3e-201, 1000)]
    grads = [torch.full((n,), v, dtype=torch.float64, device=device) for v, n in parts]
    want = [_decimal_norm([part], p) for part in parts]
    want_total = _decimal_norm(parts, p)
    assert max(want) < 1e300 and math.log2(2000) / p > 1024  # the case: a finite norm, an overflowing root
    s = gradguard.grad_stats(grads, norm_type=p)
    assert s.found_inf.item() == 0.0
    torch.testing.assert_close(s.norms.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-11, atol=0)
    torch.testing.assert_close(s.total_norm.cpu(), torch.tensor(want_total, dtype=torch.float64), rtol=1e-11, atol=0)
    assert gradguard.get_total_norm(grads, p).item() == s.total_norm.item()
    raw = torch.ops.gradguard.multi_tensor_stats(grads, p)
    args = (*raw, None, None, None, None, None, None, None, None, None, p, None, "ignore", "none", [], True)
    got, ref = torch.ops.gradguard.guard_decide(*args), reference.guard_decide(*args)
    for g, r in zip(got[:3], ref[:3]):  # the kernel in use and the reference: the same bits
        assert torch.equal(g, r), (g, r)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for q, g in zip(params, grads):
        q.grad = g.clone()
    assert gradguard.clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True).item() == s.total_norm.item()
    coef = 1.0 / (s.total_norm.item() + 1e-6)
    for q, g in zip(params, grads):
        torch.testing.assert_close(q.grad, g * coef, rtol=1e-12, atol=0)
    for on_device in (False, True):  # the guard's step, host- and device-decided
        for q, g in zip(params, grads):
            q.grad = g.clone()
        opt = GradGuard(torch.optim.SGD(params, lr=1.0), max_norm=1.0, norm_type=p, hygiene=False)
        opt._decide_on_host_on_cpu = not on_device
        before = [q.detach().clone() for q in params]
        opt.step()
        assert not opt.last.skipped and opt.last.total_norm.item() == s.total_norm.item()
        for q, b, g in zip(params, before, grads):
            torch.testing.assert_close(q.detach(), b - g * coef, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_large_p_on_small_values(dtype, device):
    """norm_type=1e6 on [3, -4] is 4 (4^1e6 overflows float64; the scaled sum does not)."""
    s = gradguard.grad_stats([torch.tensor([3.0, -4.0], dtype=dtype, device=device)], norm_type=1e6)
    assert s.found_inf.item() == 0.0
    assert s.total_norm.item() == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float64, 1e308)])
@pytest.mark.parametrize("device", DEVICES)
def test_unrepresentable_norm_is_flagged(dtype, value, device):
    """4 x 3e38 has norm 6e38, above float32's max: inf with found_inf = 1 (never inf with 0)."""
    s = gradguard.grad_stats([torch.full((4,), value, dtype=dtype, device=device)])
    assert s.nan_count.item() == 0 and s.inf_count.item() == 0
    assert math.isinf(s.total_norm.item())
    assert s.found_inf.item() == 1.0


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.float64, 1e308)])
def test_unrepresentable_norm_leaves_grads_and_params_alone(dtype, value):
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    p.grad = torch.full((4,), value, dtype=dtype)
    before = p.grad.clone()
    total = gradguard.clip_grad_norm_([p], 1.0)
    assert math.isinf(total.item())
    assert torch.equal(p.grad, before)  # not zeroed by a 0 clip factor
    opt = GradGuard(torch.optim.SGD([p], lr=0.1), max_norm=1.0)
    w0 = p.detach().clone()
    opt.step()
    assert bool(opt.last.skipped)
    assert torch.equal(p.detach(), w0)
    with pytest.raises(gradguard.NonFiniteGradError):
        GradGuard(torch.optim.SGD([p], lr=0.1), max_norm=1.0, on_nonfinite="raise").step()
    with pytest.raises(gradguard.NonFiniteGradError):
        gradguard.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.float64, 1.5e308)])
def test_the_error_for_an_overflowing_norm_says_so(dtype, value):
    """Every element finite, the norm above the dtype's range: the error names the overflow and the
    tensors whose own norm overflows (it said "non-finite gradients in 0 of 2 tensors:")."""
    ps = [torch.nn.Parameter(torch.zeros(2, dtype=dtype)) for _ in range(2)]
    ps[0].grad = torch.full((2,), value, dtype=dtype)       # its own norm overflows
    ps[1].grad = torch.ones(2, dtype=dtype)
    name = str(dtype).replace("torch.", "")
    want = rf"every gradient element is finite, but the gradient norm overflows {name} \(the norm of 1 of 2 tensors overflows: "
    for make in (lambda: GradGuard(torch.optim.SGD(ps, lr=0.1), on_nonfinite="raise", names=["a", "b"]),
                 lambda: GradGuard(torch.optim.SGD(ps, lr=0.1), max_consecutive_skips=1, names=["a", "b"])):
        with pytest.raises(gradguard.NonFiniteGradError, match=want + "a\\)") as e:
            make().step()
        assert e.value.names == ["a"]
    for kw in (dict(error_if_nonfinite=True), dict(nonfinite="raise")):
        with pytest.raises(gradguard.NonFiniteGradError, match=want + r"param\[0\]\)"):
            gradguard.clip_grad_norm_(ps, 1.0, **kw)
    # No single norm overflows, their total does.
    ps = [torch.nn.Parameter(torch.zeros(1, dtype=dtype)) for _ in range(2)]
    for q in ps:
        q.grad = torch.full((1,), value * 0.9, dtype=dtype)
    with pytest.raises(gradguard.NonFiniteGradError, match=r"no single tensor's norm overflows, the total over all 2"):
        GradGuard(torch.optim.SGD(ps, lr=0.1), on_nonfinite="raise").step()


def test_zero_mode_clips_a_norm_above_the_dtype_range_by_its_true_value():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3e38, 3e38, 3e38, math.nan])
    gradguard.clip_grad_norm_([p], 1.0, nonfinite="zero")
    expected = 1.0 / (3e38 * math.sqrt(3.0))
    torch.testing.assert_close(p.grad, torch.tensor([3e38 * expected] * 3 + [0.0]), rtol=1e-5, atol=0)


def test_spike_policy_never_absorbs_an_unrepresentable_norm():
    """ZScoreClip with no max_norm: a step whose norm overflows float32 is skipped and the
    policy's mean/variance stay finite, so a later spike is still clipped."""
    w = torch.nn.Parameter(torch.zeros(4))
    policy = ZScoreClip(z=2.5, warmup=5)
    opt = GradGuard(torch.optim.SGD([w], lr=0.0), spike=policy)
    for i in range(10):
        w.grad = torch.tensor([1.0 + 0.01 * i, 0.0, 0.0, 0.0])
        opt.step()
    w.grad = torch.full((4,), 3e38)
    opt.step()
    assert bool(opt.last.skipped)
    state = policy.state_dict()
    assert math.isfinite(state["mean"].item()) and math.isfinite(state["var"].item())
    w.grad = torch.tensor([1e6, 0.0, 0.0, 0.0])
    opt.step()
    assert opt.last.clip_coef.item() < 1e-3


def _raw_whole_and_shards(ts, p, k):
    whole = torch.ops.gradguard.multi_tensor_stats(ts, p)
    shards = [torch.ops.gradguard.multi_tensor_stats([t.reshape(-1).tensor_split(k)[j] for t in ts], p)
              for j in range(k)]
    stacked = [torch.stack([s[i] for s in shards]) for i in range(4)]
    return whole, merge_shard_stats(*stacked, norm_type=p)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, INF])
def test_merge_shard_stats_equals_the_whole(p):
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(1000, generator=g, dtype=torch.float64) * 10.0 ** e for e in (-150, 0, 150)]
    ts[1][7] = math.nan
    ts[2][5] = -math.inf
    whole, merged = _raw_whole_and_shards(ts, p, 4)
    for a, b in zip(whole, merged):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_merge_shard_stats_refuses_bad_shapes():
    a = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="amax"):
        merge_shard_stats(a, a.long(), a.long(), torch.zeros(3, dtype=torch.float64), 2.0)


@pytest.mark.parametrize("name, kernel", stats_paths())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sums_are_float64_accurate(name, kernel, dtype):
    """The squares of float32/16 input are summed in float64, not in float32 blocks, on a long sum
    whose terms vary by orders of magnitude."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3_000_001, generator=g) * torch.exp(torch.randn(3_000_001, generator=g) * 3)).clamp(-6e4, 6e4).to(dtype)
    acc, _, _, amax = kernel([x], 2.0)
    got = (amax * acc.sqrt()).item()
    expected = math.sqrt(math.fsum((x.double() ** 2).tolist()))  # exactly rounded
    if name == "reference":
        # The fallback's documented bound (gradguard/reference/stats.py): rows of 32K squares
        # summed in float32 by torch's cascade sum, merged in float64 (~1e-8 here).
        assert got == pytest.approx(expected, rel=2e-7)
    else:
        # float64 lane sums of 3M terms: ~1e-13 here; float32 block sums were ~1e-8.
        assert got == pytest.approx(expected, rel=1e-11)


def test_200_random_clip_examples_meet_a_float64_tolerance():
    g = torch.Generator().manual_seed(7)
    for i in range(200):
        n = int(torch.randint(1, 5000, (1,), generator=g))
        grads = [(torch.randn(n, generator=g) * 10 ** float(torch.randint(-8, 8, (1,), generator=g)))
                 for _ in range(3)]
        ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for q, t in zip(ps, grads):
            q.grad = t.clone()
        total = gradguard.clip_grad_norm_(ps, 0.5)
        ref = torch.linalg.vector_norm(torch.cat([t.double() for t in grads]))
        assert total.item() == pytest.approx(ref.item(), rel=1e-6), i  # the float32 result rounding
        coef = min(0.5 / (ref.item() + 1e-6), 1.0)
        # float32 rounding of the norm, the factor and the product; the pure-PyTorch fallback's
        # norm adds its documented float32 row sums (~1e-8).
        rtol = 2e-7 if gradguard.backend()["cpu"] == "extension" else 2.5e-7
        for q, t in zip(ps, grads):
            torch.testing.assert_close(q.grad.double(), (t.double() * coef).float().double(), rtol=rtol, atol=0)


def test_reference_walks_a_large_tensor_in_bounded_pieces():
    """Pieces never exceed CHUNK elements (so the float64 buffer is CHUNK * 8 bytes) and cover
    every element exactly once, for contiguous, transposed and sliced layouts."""
    base = torch.arange(3 * 70000 * 2, dtype=torch.float32).reshape(3, 70000, 2)
    for t in (base, base.transpose(0, 2), base[:, ::3, :], base[:, :, 1]):
        pieces = list(reference.stats._pieces(t, reference.stats.CHUNK))
        assert all(q.numel() <= reference.stats.CHUNK for q in pieces)
        got = torch.sort(torch.cat([q.reshape(-1) for q in pieces])).values
        assert torch.equal(got, torch.sort(t.reshape(-1)).values)


def test_reference_peak_memory_is_bounded():
    """A 256 MB float16 gradient: the reference's extra peak RSS stays under 64 MB (it used to
    copy the tensor to float64: 1 GB more)."""
    code = (
        "import resource, torch\n"
        "from gradguard import reference\n"
        "t = torch.ones(128 * 2**20, dtype=torch.float16)\n"
        "t[5] = float('nan')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "acc, nan, inf, amax = reference.multi_tensor_stats([t], 2.0)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert nan.item() == 1 and amax.item() == 1.0 and abs(acc.item() - (128 * 2**20 - 1)) < 1e-3, (acc, nan, amax)\n"
        "print((after - before) // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "GRADGUARD_DISABLE_EXT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 64, r.stdout


def test_reference_peak_memory_on_many_small_tensors_is_bounded():
    """64 MB of 1,000-element tensors: the reference padded every small tensor into its blocks at
    once (77 MB more; now one block at a time: ~23 MB, most of it the per-row results)."""
    code = (
        "import resource, torch\n"
        "from gradguard import reference\n"
        "ts = [torch.ones(1000) for _ in range(16384)]\n"
        "ts[7][3] = float('nan')\n"
        "reference.multi_tensor_stats([torch.ones(1000) for _ in range(64)], 2.0)  # first-call allocations\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "acc, nan, inf, amax = reference.multi_tensor_stats(ts, 2.0)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert int(nan.sum()) == 1 and int(nan[7]) == 1 and float(amax.max()) == 1.0\n"
        "assert torch.equal(acc[:7], torch.full((7,), 1000.0, dtype=torch.float64))\n"
        "print((after - before) // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "GRADGUARD_DISABLE_EXT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 48, r.stdout


@pytest.mark.parametrize("op, args", [
    ("multi_tensor_stats", lambda: ([torch.ones(3), torch.ones(3, device="meta")], 2.0)),
    ("multi_tensor_stats", lambda: ([torch.ones(3, device="meta"), torch.ones(3)], 2.0)),
    ("maybe_scale_", lambda: ([torch.ones(3), torch.ones(3, device="meta")], torch.tensor(2.0))),
    ("zero_nonfinite_and_scale_", lambda: ([torch.ones(3), torch.ones(3, device="meta")], torch.tensor(2.0))),
    ("zero_nonfinite_and_scale_", lambda: ([torch.ones(3)], torch.tensor(2.0, device="meta"))),
])
@pytest.mark.parametrize("path", ["dispatcher", "reference"])
def test_meta_tensor_mixed_with_real_ones_raises(op, args, path):
    fn = getattr(torch.ops.gradguard, op) if path == "dispatcher" else getattr(reference, op)
    with pytest.raises(RuntimeError, match="is on"):
        fn(*args())


def test_all_meta_still_gives_meta_results():
    acc, nan, inf, amax = torch.ops.gradguard.multi_tensor_stats([torch.ones(3, device="meta")], 2.0)
    assert acc.device.type == "meta" and acc.shape == (1,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_row_path_meets_its_stated_bound(dtype):
    """The fallback's fast path (contiguous float16/bfloat16/float32, p = 2 or inf): rows of 32K
    elements reduced by torch in float32, small tensors batched as padded rows, rows with NaN/Inf
    or outside float32's safe range redone exactly. Against exactly rounded float64 sums: norms
    within the documented 2e-7, amax and counts exact."""
    g = torch.Generator().manual_seed(5)
    big = 6e4 if dtype == torch.float16 else 1e30
    sizes = [100_000, 32768, 7, 1, 40_000, 300, 65536 + 5, 0]
    tensors = []
    for k, n in enumerate(sizes):
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)
        if k == 2:
            x = x * 1e-30  # below float32's safe range for squares: redone exactly
        if k == 4:
            x[123] = math.nan
            x[40_000 - 1] = -math.inf
        if k == 6:
            x = (x * big).clamp(-big, big)  # squares beyond float32 (except float16): redone
        tensors.append(x.to(dtype))
    # Rows of the big-tensor path whose largest square is 0 or underflows float32: a row of zeros
    # (acc 0) is told apart from a row of tiny values (redone exactly); a whole zero tensor.
    rows = torch.randn(4, 32768, generator=g)
    rows[1] = 0.0
    rows[2] *= 1e-30
    rows[3, 7] = -3e-45 if dtype == torch.float32 else 0.0
    rows[3, :7] = 0.0
    rows[3, 8:] = 0.0
    tensors += [rows.reshape(-1).to(dtype), torch.zeros(2 * 32768, dtype=dtype)]
    # amax is the square root of the largest square: a float32 x whose float32 torch.sqrt(x * x)
    # is not |x| on this CPU build (if there is one) as the largest element of a row.
    cand = torch.arange(0x3F800000, 0x3F800000 + (1 << 23), dtype=torch.int32).view(torch.float32)  # [1, 2)
    off = cand[torch.sqrt(cand * cand) != cand]
    row = torch.rand(32768, generator=g).to(dtype)
    if dtype == torch.float32 and off.numel():
        row[100] = -off[0] * 4
    tensors.append(row)
    for p in (2.0, math.inf):
        acc, nan, inf, amax = reference.multi_tensor_stats(tensors, p)
        for i, t in enumerate(tensors):
            v = t.double()
            fin = v[torch.isfinite(v)].abs()
            m = float(fin.max()) if fin.numel() else 0.0
            assert amax[i].item() == m
            assert nan[i].item() == int(torch.isnan(v).sum()) and inf[i].item() == int(torch.isinf(v).sum())
            if m == 0.0:
                assert acc[i].item() == 0.0
                continue
            if math.isinf(p):
                assert acc[i].item() == 1.0
                continue
            want = math.fsum(((fin / m) ** 2).tolist())
            assert acc[i].item() == pytest.approx(want, rel=2e-7), (i, dtype)

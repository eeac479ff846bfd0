"""CUDA kernels: the same inputs through the CUDA kernel, the CPU kernel and the float64 reference.

Everything but the build-record test needs a GPU and skips cleanly without one. Inputs plant
NaN/Inf where kernels go wrong: chunk boundaries (64K elements), 16-byte vector tails, the last
element of the last tensor, views that start at an odd element offset.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import gradguard
from gradguard import reference

HAS_GPU = torch.cuda.is_available()
BACKEND = gradguard.backend()
BUILD = BACKEND["build"] or {}
CUDA_KERNELS = BACKEND["cuda"] == "extension"

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NORMS = [2.0, 1.0, math.inf, 3.0, 0.5]
CHUNK = 1 << 16

stats_op = torch.ops.gradguard.multi_tensor_stats
scale_op = torch.ops.gradguard.zero_nonfinite_and_scale_
maybe_scale_op = torch.ops.gradguard.maybe_scale_


# --- the build record (runs without a GPU) ----------------------------------------------------


def test_cuda_build_registers_cuda_kernels():
    """A CUDA build records cuda_kernels: true and registers a CUDA kernel for every op."""
    if not BACKEND["extension_loaded"]:
        pytest.skip(f"extension not loaded: {BACKEND['reason']}")
    if not BUILD.get("cuda_kernels"):
        if torch.version.cuda is not None and os.environ.get("GRADGUARD_BUILD_CUDA") == "1":
            pytest.fail(f"GRADGUARD_BUILD_CUDA=1 with a CUDA torch, but the build record says no CUDA kernels: {BUILD}")
        pytest.skip(f"not a CUDA build: {BUILD.get('cuda_skipped')}")
    assert BUILD["torch_cuda"] == torch.version.cuda
    assert BUILD["cuda_arch_list"]
    for op in ("gradguard::multi_tensor_stats", "gradguard::maybe_scale_", "gradguard::zero_nonfinite_and_scale_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert BACKEND["cuda"] == "extension"


# --- helpers ----------------------------------------------------------------------------------


def _tol(dtype, p):
    if dtype == torch.float64 or not (p in (1.0, 2.0)):
        return 1e-9  # double accumulation (float64 input, or pow for a generic p)
    return 2e-6  # float sums of <= 32 terms, combined in double


def assert_stats_close(got, want, dtype, p, what=""):
    acc, nan, inf, amax = (x.cpu() for x in got)
    w_acc, w_nan, w_inf, w_amax = (x.cpu() for x in want)
    assert torch.equal(nan, w_nan), f"{what} NaN counts {nan} != {w_nan}"
    assert torch.equal(inf, w_inf), f"{what} Inf counts {inf} != {w_inf}"
    # |x| of a stored value is exact in every accumulation type: amax must match bit for bit.
    torch.testing.assert_close(amax, w_amax, rtol=0, atol=0, msg=lambda m: f"{what} amax: {m}")
    torch.testing.assert_close(acc, w_acc, rtol=_tol(dtype, p), atol=0, msg=lambda m: f"{what} acc: {m}")


def planted(sizes, dtype, device="cpu", seed=0):
    """Random tensors with NaN/Inf at chunk boundaries, vector tails and the very last element."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if k % 4 != 3:  # every fourth tensor stays finite
            for j, idx in enumerate((CHUNK - 1, CHUNK, 2 * CHUNK + 1, n - 1, n - 3)):
                if 0 <= idx < n:
                    x[idx] = (math.nan, math.inf, -math.inf)[(j + k) % 3]
        out.append(x.to(dtype).to(device))
    last = out[-1]
    if last.numel():
        last.view(-1)[-1] = math.inf
    return out


SIZES = [0, 1, 3, 7, 9, 17, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 12345]


def three_way(tensors_cuda, p):
    """(CUDA via the dispatcher, CPU via the dispatcher, float64 reference on CPU)."""
    cpu = [t.cpu() for t in tensors_cuda]
    return stats_op(tensors_cuda, p), stats_op(cpu, p), reference.multi_tensor_stats(cpu, p)


# --- multi_tensor_stats -----------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_cuda_cpu_reference(dtype, p):
    ts = planted(SIZES, dtype, "cuda")
    got, cpu, ref = three_way(ts, p)
    assert all(r.device.type == "cuda" for r in got)
    assert [r.dtype for r in got] == [torch.float64, torch.int64, torch.int64, torch.float64]
    assert_stats_close(got, ref, dtype, p, "cuda vs reference")
    assert_stats_close(cpu, ref, dtype, p, "cpu vs reference")
    assert int(got[1].sum() + got[2].sum()) > 0  # the planted values were seen


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stats_more_tensors_than_one_launch(dtype):
    # One launch takes at most 1000 tensors (32 KB of kernel arguments); 2,500 of mixed sizes,
    # empty ones included, span three.
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (2500,), generator=g).tolist()
    sizes[1234] = 3 * CHUNK + 7
    ts = planted(sizes, dtype, "cuda", seed=2)
    got, _, ref = three_way(ts, 2.0)
    assert_stats_close(got, ref, dtype, 2.0)


@needs_gpu
@pytest.mark.parametrize("offset", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_misaligned_views(dtype, offset):
    base = planted([4 * CHUNK + 41], dtype, "cuda", seed=offset)[0]
    views = [base[offset:], base[offset:offset + CHUNK + 3], base[offset:-offset]]
    views[0][CHUNK - 1] = math.nan  # a chunk boundary as seen from the view
    for p in (2.0, math.inf):
        got, _, ref = three_way(views, p)
        assert_stats_close(got, ref, dtype, p, f"offset {offset}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stats_noncontiguous_views(dtype):
    base = planted([3 * CHUNK + 512 * 9], dtype, "cuda")[0][: 3 * CHUNK + 512 * 8].view(-1, 512)
    views = [
        base.t(),                      # dense but permuted: read as one span
        base[:, ::2],                  # gaps: strided kernel
        base[1::3, 5:300],             # gaps in two dims
        base[:1].expand(7, 512),       # stride 0: every logical element counts
        base.view(-1, 8, 64).permute(2, 0, 1)[:, ::2],
    ]
    for p in (2.0, 1.0, math.inf, 3.0):
        got, _, ref = three_way(views, p)
        assert_stats_close(got, ref, dtype, p)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_extreme_magnitudes_stay_finite(dtype):
    # 1e20^2 overflows float32 and 1e-25^2 underflows it: the kernel must sum such chunks in
    # double, so the norm is 1e20 (not inf) and tiny gradients keep their norm.
    big = torch.full((CHUNK + 3,), 1e20, dtype=dtype, device="cuda")
    tiny = torch.full((1000,), 1e-25, dtype=dtype, device="cuda")
    mixed = torch.randn(CHUNK * 2, device="cuda").to(dtype)
    mixed[7] = 3e19
    got, _, ref = three_way([big, tiny, mixed], 2.0)
    assert_stats_close(got, ref, dtype, 2.0)
    assert torch.isfinite(got[0]).all()
    stats = gradguard.grad_stats([torch.full((4,), 1e20, device="cuda")])
    torch.testing.assert_close(stats.total_norm.cpu(), torch.tensor(2e20), rtol=1e-6, atol=0)
    assert float(stats.found_inf) == 0.0


@needs_gpu
def test_stats_deterministic():
    ts = planted([5 * CHUNK + 11, 77, 2 * CHUNK], torch.float32, "cuda")
    first = stats_op(ts, 2.0)
    for _ in range(3):
        again = stats_op(ts, 2.0)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_gpu
def test_stats_uses_current_stream_and_device():
    s = torch.cuda.Stream()
    x = torch.randn(3 * CHUNK, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # an op on another stream would run before the mul_
        x.mul_(2.0)
        got = stats_op([x], 2.0)
    s.synchronize()
    torch.testing.assert_close(got[0].cpu(), (x.double() ** 2).sum().cpu().reshape(1), rtol=2e-6, atol=0)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_stats_second_device_and_gather():
    a = torch.randn(1000, device="cuda:1")
    got = stats_op([a], 2.0)
    assert got[0].device == torch.device("cuda:1")
    stats = gradguard.grad_stats([torch.randn(10, device="cuda:0"), a])
    assert stats.norms.device == torch.device("cuda:0")


@needs_gpu
@pytest.mark.skipif(HAS_GPU and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
                    reason="needs ~10 GB of GPU memory")
def test_stats_tensor_over_2_31_elements():
    n = 2**31 + 2 * CHUNK + 3
    x = torch.ones(n, dtype=torch.float16, device="cuda")
    x[n - 1] = math.nan
    x[2**31] = -math.inf
    x[17] = 4.0
    acc, nan, inf, amax = (r.cpu() for r in stats_op([x], 2.0))
    assert int(nan) == 1 and int(inf) == 1 and float(amax) == 4.0
    assert float(acc) == float(n - 3 + 16)  # ones and one 4^2, summed exactly
    del x
    torch.cuda.empty_cache()


@needs_gpu
def test_stats_opcheck():
    ts = planted([100, CHUNK + 1], torch.float32, "cuda")
    torch.library.opcheck(stats_op, (ts, 2.0))


# --- zero_nonfinite_and_scale_ ----------------------------------------------------------------


def _scaled_cpu(tensors, scale):
    """(CPU kernel result, float64-free reference result) on CPU copies."""
    ext = [t.detach().cpu().clone() for t in tensors]
    ref = [t.detach().cpu().clone() for t in tensors]
    if BACKEND["cpu"] == "extension":
        scale_op(ext, scale.detach().cpu())
    else:
        ext = None
    reference.zero_nonfinite_and_scale_(ref, scale.detach().cpu())
    return ext, ref


# The reference (and the CPU maybe_scale_, torch's foreach multiply) multiply by the factor
# rounded to the tensor's dtype (torch's type promotion for a 0-dim factor); the CUDA kernels
# multiply by the float factor: allow one rounding step there, absolute in the subnormal range.
_SCALE_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 0.0, torch.float64: 0.0}


def _scale_atol(dtype):
    return torch.finfo(dtype).tiny if dtype in (torch.float16, torch.bfloat16) else 0.0


@needs_gpu
@pytest.mark.parametrize("scale_kind", ["cuda", "cuda64", "cpu"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_matches_cpu_and_reference(dtype, scale_kind):
    ts = planted(SIZES, dtype, "cuda")
    bases = planted([2 * CHUNK + 37] * 4, dtype, "cuda", seed=3)
    views = [bases[0][1:], bases[1][3:CHUNK + 9], bases[2][:2 * CHUNK].view(-1, 256)[:, ::3],
             bases[3][:4096].view(64, 64).t()]
    untouched = bases[1][:3].clone()
    scale = {"cuda": torch.tensor(0.37, device="cuda"),
             "cuda64": torch.tensor(0.37, dtype=torch.float64, device="cuda"),
             "cpu": torch.tensor(0.37)}[scale_kind]
    ext, ref = _scaled_cpu(ts + views, scale)
    scale_op(ts + views, scale)
    tol = _SCALE_TOL[dtype]
    for i, got in enumerate(ts + views):
        got = got.cpu()
        if ext is not None:
            assert torch.equal(got, ext[i]), f"tensor {i}: CUDA and CPU kernels differ"
        torch.testing.assert_close(got, ref[i], rtol=tol, atol=_scale_atol(dtype))
        assert torch.isfinite(got).all()
    assert torch.equal(bases[1][:3], untouched)  # outside the view: not written


@needs_gpu
def test_scale_many_tensors_and_internal_overlap():
    ts = planted(torch.randint(1, 500, (2100,)).tolist(), torch.float32, "cuda", seed=4)
    scale = torch.tensor(2.0, device="cuda")
    _, want = _scaled_cpu(ts, scale)
    scale_op(ts, scale)
    for got, w in zip(ts, want):
        torch.testing.assert_close(got.cpu(), w, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="internal overlap|unsupported operation"):
        scale_op([torch.zeros(1, device="cuda").expand(4)], scale)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_maybe_scale_matches_cpu_and_leaves_bits_at_one(dtype):
    ts = planted(SIZES, dtype, "cuda")
    base = planted([2 * CHUNK + 37], dtype, "cuda", seed=9)[0]
    views = [base[1:CHUNK + 5], base[CHUNK + 7:].view(-1)[::3]]
    lists = ts + views
    for scale in (torch.tensor(0.37, device="cuda"), torch.tensor(0.37, dtype=torch.float64, device="cuda"),
                  torch.tensor(0.37)):
        want = [t.cpu().clone() for t in lists]
        if BACKEND["cpu"] == "extension":
            maybe_scale_op(want, scale.cpu())
        else:
            for w in want:
                w.mul_(scale.to(torch.float32 if dtype != torch.float64 else torch.float64))
        maybe_scale_op(lists, scale)
        for got, w in zip(lists, want):
            torch.testing.assert_close(got.cpu(), w, rtol=_SCALE_TOL[dtype], atol=_scale_atol(dtype), equal_nan=True)
    # scale exactly 1, on the device or on the host: not one bit rewritten, NaN payloads included
    x = torch.randn(CHUNK + 9, device="cuda").to(dtype)
    bits_view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                 torch.float64: torch.int64}[dtype]
    payload_nan = {torch.int16: 0x7E01, torch.int32: 0x7FC00001, torch.int64: 0x7FF8000000000001}[bits_view]
    x.view(bits_view)[3] = payload_nan
    before = x.view(bits_view).clone()
    for one in (torch.tensor(1.0, device="cuda"), torch.tensor(1.0)):
        maybe_scale_op([x, x[1::2]], one)
        assert torch.equal(x.view(bits_view), before)


@needs_gpu
def test_scale_opcheck():
    ts = planted([100, CHUNK + 1], torch.float32, "cuda")
    torch.library.opcheck(scale_op, (ts, torch.tensor(0.5, device="cuda")))
    torch.library.opcheck(maybe_scale_op, (ts, torch.tensor(0.5, device="cuda")))


# --- no host sync, CUDA graphs ----------------------------------------------------------------


def _model_grads(device="cuda", nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)
    model(torch.randn(32, 64, device=device)).square().mean().backward()
    params = list(model.parameters())
    if nan_at is not None:
        params[nan_at].grad.view(-1)[-1] = math.nan
    return params


@needs_gpu
@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_no_host_sync(nonfinite):
    params = _model_grads(nan_at=1)
    grads = [p.grad for p in params]
    mixed = grads + [torch.randn(100, device="cuda", dtype=torch.bfloat16)]
    # warm up once outside the check (lazy CUDA initialisation may sync)
    gradguard.grad_stats(mixed)
    gradguard.all_finite(grads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = gradguard.grad_stats(mixed)
        ok = gradguard.all_finite(grads)
        total = gradguard.clip_grad_norm_(params, 1.0, nonfinite=nonfinite)
        gradguard.grad_stats(grads, norm_type=math.inf)
        gradguard.grad_stats(grads, norm_type=3.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(stats.found_inf) == 1.0 and not bool(ok) and math.isnan(float(total))


@needs_gpu
def test_cuda_graph_capture_and_replay():
    params = _model_grads()
    grads = [p.grad for p in params]
    fresh = [torch.randn_like(g) for g in grads]
    fresh[2].view(-1)[5] = math.inf

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream, as torch.cuda.graphs asks
        gradguard.grad_stats(grads)
        gradguard.clip_grad_norm_(params, 1e9)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = gradguard.grad_stats(grads)
        finite = gradguard.all_finite(grads)
        total = gradguard.clip_grad_norm_(params, 0.5, nonfinite="zero")

    for g, f in zip(grads, fresh):
        g.copy_(f)
    expected_stats = reference.multi_tensor_stats([f.cpu() for f in fresh], 2.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(stats.nan_count.cpu(), expected_stats[1])
    torch.testing.assert_close(stats.inf_count.cpu(), expected_stats[2])
    torch.testing.assert_close(stats.norms.cpu()[[0, 1, 3]],
                               expected_stats[0][[0, 1, 3]].sqrt().float(), rtol=1e-5, atol=0)
    assert float(stats.found_inf) == 1.0 and not bool(finite) and math.isinf(float(total))
    # nonfinite="zero": the Inf became 0, the rest was clipped to norm 0.5
    finite_norm = math.sqrt(float(expected_stats[0].sum()))
    coef = min(0.5 / (finite_norm + 1e-6), 1.0)
    for g, f in zip(grads, fresh):
        want = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) * coef
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)

    # replay again on finite gradients: the graph reads the new values
    for g, f in zip(grads, fresh):
        g.copy_(f.nan_to_num(posinf=1.0))
    graph.replay()
    torch.cuda.synchronize()
    assert float(stats.found_inf) == 0.0 and bool(finite)


# --- safe math (ops defined by gradguard/_safe_math_ops.py) -------------------------------------

HAS_SAFE_MATH = hasattr(torch.ops.gradguard, "safe_log")
needs_safe_math = pytest.mark.skipif(not (HAS_GPU and HAS_SAFE_MATH),
                                     reason="needs a CUDA GPU and the safe math ops")


def _special(dtype, n=4099, seed=0):
    """Random values over many magnitudes plus the edge cases: NaN, +-inf, +-0, the bounds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 4)
    edge = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-6, -1e-6, 1e-12, 1.0, -1.0, 88.0, 89.0, 11.0,
                         12.0, 709.0, 710.0, 1e-30, 65504.0, 3e38], dtype=torch.float64)
    x[: edge.numel()] = edge
    return x.to(dtype).cuda()


def _bits_equal(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _ref_ops():
    from gradguard.reference import safe_math as ref
    return ref


SAFE_UNARY = [  # (op, reference, bound, straight_through argument?)
    ("safe_log", "safe_log", 1e-6, True),
    ("safe_exp", "safe_exp", 80.0, True),
    ("safe_sqrt", "safe_sqrt", 1e-6, False),
]


@needs_safe_math
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name,refname,bound,has_st", SAFE_UNARY)
def test_safe_unary_forward_bitwise(name, refname, bound, has_st, dtype):
    ref = _ref_ops()
    x = _special(dtype)
    args = (bound, False) if has_st else (bound,)
    op = getattr(torch.ops.gradguard, name)
    got = op(x, *args)
    _bits_equal(got, getattr(ref, refname)(x, *args), f"{name} vs the composite on CUDA")
    # and against the CPU kernel: CPU log/exp are other libm routines (MKL, Sleef), so they agree
    # to an ulp or so (absolute in the subnormal range); sqrt is correctly rounded everywhere
    cpu = op(x.cpu(), *args)
    if name == "safe_sqrt":
        _bits_equal(got.cpu(), cpu, f"{name} CUDA vs CPU")
    else:
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 3e-7, torch.float64: 1e-15}[dtype]
        torch.testing.assert_close(got.cpu(), cpu, rtol=tol, atol=torch.finfo(dtype).tiny, equal_nan=True)
    # out= variant, views, empty and 0-dim inputs
    out = torch.empty(0, dtype=dtype, device="cuda")
    getattr(torch.ops.gradguard, name).out(x, *args, out=out)
    _bits_equal(out, got, f"{name}.out")
    view = x.view(-1)[1:].as_strided((40, 50), (1, 80))
    _bits_equal(op(view, *args), getattr(ref, refname)(view, *args), f"{name} on a strided view")
    assert op(x[:0], *args).shape == (0,)
    _bits_equal(op(x[7], *args), getattr(ref, refname)(x[7], *args), f"{name} 0-dim")


@needs_safe_math
@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_safe_unary_backward_bitwise(dtype, straight_through):
    ref = _ref_ops()
    x = _special(dtype).abs_()  # the backward edge cases live around the lower bound
    x[30:60] = _special(dtype, 30, seed=5)
    g = _special(dtype, x.numel(), seed=7)
    ops = torch.ops.gradguard
    for eps in (1e-6, 0.0, 0.5):
        _bits_equal(ops.safe_log_backward(g, x, eps, straight_through),
                    ref.safe_log_backward(g, x, eps, straight_through), f"safe_log_backward eps={eps}")
        _bits_equal(ops.safe_sqrt_backward(g, x, eps), ref.safe_sqrt_backward(g, x, eps),
                    f"safe_sqrt_backward eps={eps}")
    for m in (10.0, 88.0):
        r = ops.safe_exp(x, m, straight_through)
        _bits_equal(ops.safe_exp_backward(g, r, x, m, straight_through),
                    ref.safe_exp_backward(g, r, x, m, straight_through), f"safe_exp_backward max={m}")


@needs_safe_math
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_safe_div_forward_backward_bitwise(dtype):
    ref = _ref_ops()
    a = _special(dtype).view(1, -1)[:, :4096].reshape(64, 64)
    b = _special(dtype, seed=3)[:4096].reshape(64, 64)
    b[::7] = 0.0
    b[1, 1] = -0.0
    b[2, :5] = 1e-7
    ops = torch.ops.gradguard
    for other in (b, b[:1], b[:, :1], b.t()):  # same shape, broadcast rows/columns, a transposed view
        for eps, fill in ((1e-6, 0.0), (0.0, 1.0), (0.1, -3.0)):
            _bits_equal(ops.safe_div(a, other, eps, fill), ref.safe_div(a, other, eps, fill), "safe_div")
            out = torch.empty(0, dtype=dtype, device="cuda")
            ops.safe_div.out(a, other, eps, fill, out=out)
            _bits_equal(out, ref.safe_div(a, other, eps, fill), "safe_div.out")
            g = _special(dtype, 4096, seed=11).reshape(64, 64)
            gi, go = ops.safe_div_backward(g, a, other, eps)
            ri, ro = ref.safe_div_backward(g, a, other, eps)
            _bits_equal(gi, ri, "safe_div_backward grad_input")
            _bits_equal(go, ro, "safe_div_backward grad_other")


@needs_safe_math
def test_safe_math_autograd_and_gradcheck():
    ops = torch.ops.gradguard
    x = (torch.rand(257, dtype=torch.float64, device="cuda") + 0.1).requires_grad_()
    y = (torch.rand(257, dtype=torch.float64, device="cuda") + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda t: ops.safe_log(t, 1e-6, False), (x,))
    torch.autograd.gradcheck(lambda t: ops.safe_exp(t, 5.0, False), (x,))
    torch.autograd.gradcheck(lambda t: ops.safe_sqrt(t, 1e-6), (x,))
    torch.autograd.gradcheck(lambda s, t: ops.safe_div(s, t, 1e-6, 0.0), (x, y))
    # gradients through autograd are the reference backward's, bit for bit (compared with the
    # reference rather than torch's own clamp autograd, whose mask at x == eps changed between
    # torch releases)
    ref = _ref_ops()
    x32 = _special(torch.float32).abs_().requires_grad_()
    g = torch.randn_like(x32)
    (gx,) = torch.autograd.grad(ops.safe_log(x32, 1e-6, False), x32, g)
    _bits_equal(gx, ref.safe_log_backward(g, x32.detach(), 1e-6, False), "safe_log autograd")
    (gx,) = torch.autograd.grad(ops.safe_exp(x32, 10.0, False), x32, g)
    r = ops.safe_exp(x32.detach(), 10.0, False)
    _bits_equal(gx, ref.safe_exp_backward(g, r, x32.detach(), 10.0, False), "safe_exp autograd")


@needs_safe_math
def test_safe_math_opcheck():
    # finite inputs: opcheck compares eager and traced outputs with ==, so no NaN may come out
    x = torch.rand(300, device="cuda") + 0.1
    x[::17] = 0.0
    b = torch.randn(300, device="cuda")
    b[::7] = 0.0
    ops = torch.ops.gradguard
    # opcheck takes one overload at a time
    torch.library.opcheck(ops.safe_log.default, (x, 1e-6, False))
    torch.library.opcheck(ops.safe_log.out, (x, 1e-6, False), {"out": torch.empty_like(x)})
    torch.library.opcheck(ops.safe_exp.default, (x, 20.0, True))
    torch.library.opcheck(ops.safe_sqrt.default, (x, 1e-6))
    torch.library.opcheck(ops.safe_div.default, (x, b, 1e-6, 0.0))
    torch.library.opcheck(ops.safe_log_backward.default, (b, x, 1e-3, False))
    torch.library.opcheck(ops.safe_div_backward.default, (x, x, b, 1e-6))


@needs_safe_math
def test_safe_math_refuses_what_cpu_refuses():
    ops = torch.ops.gradguard
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        ops.safe_log(torch.ones(4, dtype=torch.int32, device="cuda"), 1e-6, False)
    with pytest.raises(RuntimeError, match="must not be NaN"):
        ops.safe_log(x, math.nan, False)
    with pytest.raises(RuntimeError, match="they must match"):
        ops.safe_div(x, x.double(), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="`out` has dtype"):
        ops.safe_exp.out(x, 1.0, False, out=torch.empty(4, dtype=torch.float64, device="cuda"))

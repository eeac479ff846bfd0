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



def needs_gpu(test):
    """Skips without a GPU; marked `cuda` so benchmarks/gpu_check.sh can select it."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")(test))


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
    for op in ("gradguard::multi_tensor_stats", "gradguard::guard_decide", "gradguard::maybe_scale_",
               "gradguard::zero_nonfinite_and_scale_"):
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


# Integer views for bit comparisons, and a quiet NaN with a payload in each dtype (bfloat16's
# exponent is 8 bits: 0x7E01 would be a finite number there).
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
PAYLOAD_NAN = {torch.float16: 0x7E01, torch.bfloat16: 0x7FC1, torch.float32: 0x7FC00001,
               torch.float64: 0x7FF8000000000001}


def assert_bits_equal(got, want, what=""):
    """The same NaN positions and, everywhere else, the same bits (so -0.0 != 0.0, which
    assert_close would accept). NaN payloads are not compared: kernels may quiet them."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
        f"{want.dtype}{tuple(want.shape)}"
    g, w = got.detach().cpu().reshape(-1), want.detach().cpu().reshape(-1)
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN at different positions ({int(nan_g.sum())} vs {int(nan_w.sum())})"
    keep = ~nan_g
    diff = (g.view(BITS[g.dtype])[keep] != w.view(BITS[w.dtype])[keep]).nonzero()
    if diff.numel():
        i = int(keep.nonzero()[int(diff[0])])
        raise AssertionError(f"{what}: {diff.numel()} of {int(keep.sum())} non-NaN elements differ in their bits; "
                             f"first at {i}: {g[i].item()!r} vs {w[i].item()!r}")


def libm_rtol(dtype):
    """CPU (Sleef, glibc) and CUDA (expf/logf) transcendentals agree to 2-3 ulp, not bit for bit;
    the half types compute in float and round once, so they may land 1-2 ulp apart."""
    return {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 4}[dtype] * torch.finfo(dtype).eps


SIZES = [0, 1, 3, 7, 9, 17, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 12345]


def three_way(tensors_cuda, p):
    """(CUDA via the dispatcher, CPU via the dispatcher, float64 reference on CPU)."""
    cpu = [t.cpu() for t in tensors_cuda]
    return stats_op(tensors_cuda, p), stats_op(cpu, p), reference.multi_tensor_stats(cpu, p)


# --- multi_tensor_stats -----------------------------------------------------------------------


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_device_cpu_reference(dtype, p, device):
    ts = planted(SIZES, dtype, device)
    got, cpu, ref = three_way(ts, p)
    assert all(r.device.type == device for r in got)
    assert [r.dtype for r in got] == [torch.float64, torch.int64, torch.int64, torch.float64]
    assert_stats_close(got, ref, dtype, p, f"{device} vs reference")
    assert_stats_close(cpu, ref, dtype, p, "cpu vs reference")
    assert int(got[1].sum() + got[2].sum()) > 0  # the planted values were seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stats_more_tensors_than_one_launch(dtype, device):
    # One launch takes at most 1000 tensors (32 KB of kernel arguments); 2,500 of mixed sizes,
    # empty ones included, span three.
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (2500,), generator=g).tolist()
    sizes[1234] = 3 * CHUNK + 7
    ts = planted(sizes, dtype, device, seed=2)
    got, _, ref = three_way(ts, 2.0)
    assert_stats_close(got, ref, dtype, 2.0)


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_misaligned_views(dtype, offset, device):
    base = planted([4 * CHUNK + 41], dtype, device, seed=offset)[0]
    views = [base[offset:], base[offset:offset + CHUNK + 3], base[offset:-offset]]
    views[0][CHUNK - 1] = math.nan  # a chunk boundary as seen from the view
    for p in (2.0, math.inf):
        got, _, ref = three_way(views, p)
        assert_stats_close(got, ref, dtype, p, f"offset {offset}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stats_noncontiguous_views(dtype, device):
    base = planted([3 * CHUNK + 512 * 9], dtype, device)[0][: 3 * CHUNK + 512 * 8].view(-1, 512)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_extreme_magnitudes_stay_finite(dtype, device):
    # 1e20^2 overflows float32 and 1e-25^2 underflows it: the kernel must sum such chunks in
    # double, so the norm is 1e20 (not inf) and tiny gradients keep their norm.
    big = torch.full((CHUNK + 3,), 1e20, dtype=dtype, device=device)
    tiny = torch.full((1000,), 1e-25, dtype=dtype, device=device)
    mixed = torch.randn(CHUNK * 2, device=device).to(dtype)
    mixed[7] = 3e19
    got, _, ref = three_way([big, tiny, mixed], 2.0)
    assert_stats_close(got, ref, dtype, 2.0)
    assert torch.isfinite(got[0]).all()
    stats = gradguard.grad_stats([torch.full((4,), 1e20, device=device)])
    torch.testing.assert_close(stats.total_norm.cpu(), torch.tensor(2e20), rtol=1e-6, atol=0)
    assert float(stats.found_inf) == 0.0


def test_stats_deterministic(device):
    ts = planted([5 * CHUNK + 11, 77, 2 * CHUNK], torch.float32, device)
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
    # acc is normalized by the tensor's amax: sum((|x| / amax)^2)
    amax = x.double().abs().max()
    torch.testing.assert_close(got[3].cpu(), amax.cpu().reshape(1), rtol=0, atol=0)
    torch.testing.assert_close(got[0].cpu(), ((x.double() / amax) ** 2).sum().cpu().reshape(1), rtol=2e-6, atol=0)


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
    # acc = sum((|x| / amax)^2): n - 3 ones of (1/4)^2 and the 4 itself, all exact in float64
    assert float(acc) == (n - 3) / 16 + 1
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


# Both kernels, and the reference on the CPU (torch's mul_/_foreach_mul_), multiply a float16/
# bfloat16 tensor by the float factor (bfloat16 3.0 x 0.3: 0.8984375, checked on the CPU); torch's
# CUDA multiply by a 0-dim CUDA factor may load it in the tensor's dtype first (0.90234375, from
# torch's source, not yet run on a GPU): allow one rounding step, absolute in the subnormal range.
_SCALE_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 0.0, torch.float64: 0.0}


def _scale_atol(dtype):
    return torch.finfo(dtype).tiny if dtype in (torch.float16, torch.bfloat16) else 0.0


@pytest.mark.parametrize("scale_kind", ["device", "device64", "cpu"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_matches_cpu_and_reference(dtype, scale_kind, device):
    ts = planted(SIZES, dtype, device)
    bases = planted([2 * CHUNK + 37] * 4, dtype, device, seed=3)
    views = [bases[0][1:], bases[1][3:CHUNK + 9], bases[2][:2 * CHUNK].view(-1, 256)[:, ::3],
             bases[3][:4096].view(64, 64).t()]
    untouched = bases[1][:3].clone()
    scale = {"device": torch.tensor(0.37, device=device),
             "device64": torch.tensor(0.37, dtype=torch.float64, device=device),
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


def test_scale_many_tensors_and_internal_overlap(device):
    ts = planted(torch.randint(1, 500, (2100,)).tolist(), torch.float32, device, seed=4)
    scale = torch.tensor(2.0, device=device)
    _, want = _scaled_cpu(ts, scale)
    scale_op(ts, scale)
    for got, w in zip(ts, want):
        torch.testing.assert_close(got.cpu(), w, rtol=0, atol=0)
    # Refused before the first launch: the strided tensor before it is left unscaled.
    first = torch.arange(6.0, device=device)[::2]
    with pytest.raises(RuntimeError, match="internal overlap|unsupported operation"):
        scale_op([first, torch.zeros(1, device=device).expand(4)], scale)
    assert torch.equal(first.cpu(), torch.tensor([0.0, 2.0, 4.0]))


@pytest.mark.parametrize("op", [scale_op, maybe_scale_op], ids=["zero_nonfinite_and_scale_", "maybe_scale_"])
def test_scale_a_tensor_listed_twice_is_scaled_twice(op, device):
    # One launch held both copies' chunks: blocks raced over the shared elements, each ending as
    # x*s or x*s^2 at random. Now one launch per tensor, in order, as the CPU kernel runs them.
    g = torch.arange(1.0, 1 + 3 * CHUNK, device=device)
    other = torch.ones(CHUNK + 5, device=device)
    op([g, other, g.view(3, CHUNK)[1:]], torch.tensor(2.0, device=device))
    want = torch.arange(1.0, 1 + 3 * CHUNK) * 2
    want[CHUNK:] *= 2
    assert torch.equal(g.cpu(), want) and torch.equal(other.cpu(), torch.full((CHUNK + 5,), 2.0))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_maybe_scale_matches_cpu_and_leaves_bits_at_one(dtype, device):
    ts = planted(SIZES, dtype, device)
    base = planted([2 * CHUNK + 37], dtype, device, seed=9)[0]
    views = [base[1:CHUNK + 5], base[CHUNK + 7:].view(-1)[::3]]
    lists = ts + views
    for scale in (torch.tensor(0.37, device=device), torch.tensor(0.37, dtype=torch.float64, device=device),
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
    x = torch.randn(CHUNK + 9, device=device).to(dtype)
    bits_view = BITS[dtype]
    x.view(bits_view)[3] = PAYLOAD_NAN[dtype]
    x[5] = -0.0
    assert torch.isnan(x[3]) and not torch.isnan(x[4]), "the payload NaN is not a NaN in this dtype"
    before = x.view(bits_view).clone()
    for one in (torch.tensor(1.0, device=device), torch.tensor(1.0)):
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
def test_reference_stats_and_clip_with_norm_make_no_host_copy_once_warm():
    # The pure-PyTorch kernels (what a CUDA device runs when the extension is not built) keep
    # their promise of no sync too: the pieces' index is built once per layout, and a number
    # max_norm is filled on the device rather than copied from the host.
    params = _model_grads(nan_at=1)
    grads = [p.grad for p in params]
    reference.multi_tensor_stats(grads, 2.0)
    total = gradguard.get_total_norm(grads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc, nan, inf, amax = reference.multi_tensor_stats(grads, 2.0)
        gradguard.clip_grads_with_norm_(params, 0.5, total)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(nan.sum()) == 1


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
    # the op's acc is normalized by each tensor's amax: norm = amax * sqrt(acc)
    ref_norms = expected_stats[3] * expected_stats[0].sqrt()
    torch.testing.assert_close(stats.norms.cpu()[[0, 1, 3]], ref_norms[[0, 1, 3]].float(), rtol=1e-5, atol=0)
    assert float(stats.found_inf) == 1.0 and not bool(finite) and math.isinf(float(total))
    # nonfinite="zero": the Inf became 0, the rest was clipped to norm 0.5
    finite_norm = math.sqrt(sum(float(t.double().nan_to_num(posinf=0.0, neginf=0.0).pow(2).sum()) for t in fresh))
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
    assert_bits_equal(got, want, what)


def _cuda_clamp_keeps_negative_zero() -> bool:
    return bool(torch.signbit(torch.clamp(torch.tensor([-0.0], device="cuda"), min=0.0)).item())


def _bits_equal_but_zero_sign(got, want, x, what):
    """Bit-equal, except where x is -0.0 when this torch's CUDA clamp(-0.0, min=0) gives +0.0
    (some releases: pytorch#114569): there the kernels keep -0.0, as torch's CPU clamp does, and
    only the magnitudes are compared (1 / -0.0 = -inf against +inf)."""
    neg_zero = (x == 0) & torch.signbit(x)
    if not _cuda_clamp_keeps_negative_zero() and bool(neg_zero.any()):
        got, want = torch.where(neg_zero, got.abs(), got), torch.where(neg_zero, want.abs(), want)
    assert_bits_equal(got, want, what)


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
        torch.testing.assert_close(got.cpu(), cpu, rtol=libm_rtol(dtype), atol=torch.finfo(dtype).tiny, equal_nan=True)
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
        _bits_equal_but_zero_sign(ops.safe_log_backward(g, x, eps, straight_through),
                                  ref.safe_log_backward(g, x, eps, straight_through), x,
                                  f"safe_log_backward eps={eps}")
        _bits_equal_but_zero_sign(ops.safe_sqrt_backward(g, x, eps), ref.safe_sqrt_backward(g, x, eps), x,
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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safe_div_by_a_float32_divisor_bitwise(dtype):
    # The op's float16/bfloat16 input by a 0-dim float32 divisor (how gradguard.safe_div divides by
    # a number): in float32, rounded once, the divisor a value read on the host (a CPU tensor) or
    # read by every thread through a CUDA tensor's pointer. IEEE division, as the CPU reference's;
    # torch's CUDA division by a CPU scalar multiplies by the reciprocal (an ulp apart at most).
    ops = torch.ops.gradguard
    ref = _ref_ops()
    a = _special(dtype)
    for d in (0.37, -3.3, 1e5, 1e-30, 3e38, math.inf, math.nan, 0.0, -1e-4):
        for other in (torch.tensor(d), torch.tensor(d, device="cuda")):
            for eps, fill in ((0.0, 0.0), (1e-3, 2.5)):
                what = f"safe_div by a float32 {other.device.type} {d}, eps={eps}"
                want = ref.safe_div(a.cpu(), other.cpu(), eps, fill)
                _bits_equal(ops.safe_div(a, other, eps, fill), want, what)
                out = torch.empty(0, dtype=dtype, device="cuda")
                ops.safe_div.out(a, other, eps, fill, out=out)
                _bits_equal(out, want, what + " out=")
                if other.is_cuda:  # the reference's torch.div by a CUDA tensor: IEEE division too
                    _bits_equal(ref.safe_div(a, other, eps, fill), want, what + " (reference on CUDA)")
    # A 0-dim CPU input with a CUDA divisor is divided on the GPU.
    one = torch.tensor(1.5, dtype=dtype)
    r = ops.safe_div(one, torch.tensor(0.37, device="cuda"), 0.0, 0.0)
    assert r.device.type == "cuda" and r.dtype == dtype
    _bits_equal(r, torch.div(one, 0.37), "0-dim CPU input")
    # The public function: forward and the input's gradient (the op again), as on the CPU.
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4099, generator=gen) * 100).to(dtype).cuda().requires_grad_(True)
    g = torch.randn(4099, generator=gen).to(dtype).cuda()
    y = gradguard.safe_div(x, 0.37)
    (gx,) = torch.autograd.grad(y, x, g)
    xc = x.detach().cpu().requires_grad_(True)
    (gc,) = torch.autograd.grad(gradguard.safe_div(xc, 0.37), xc, g.cpu())
    _bits_equal(y, gradguard.safe_div(xc.detach(), 0.37), "safe_div(x, 0.37) CUDA vs CPU")
    _bits_equal(gx, gc, "safe_div(x, 0.37) input gradient CUDA vs CPU")
    # A 0-dim CPU tensor divisor (a loss scale), needing a gradient or not: the same one-pass
    # input gradient (it took the whole-copy formula, with torch's reciprocal multiply).
    for d in (torch.tensor(0.37), torch.tensor(0.37, requires_grad=True)):
        (gx2,) = torch.autograd.grad(gradguard.safe_div(x, d), x, g)
        _bits_equal(gx2, gx, f"input gradient with a CPU divisor (requires_grad={d.requires_grad})")
    d = torch.tensor(0.37, requires_grad=True)
    (gd,) = torch.autograd.grad(gradguard.safe_div(x, d), d, g)
    assert gd.device.type == "cpu"
    exact = -(g.double() * x.detach().double()).sum().cpu() / 0.37 ** 2
    torch.testing.assert_close(gd.double(), exact, rtol=1e-5, atol=1e-30)


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


# --- scale kernels: strided views over many blocks, > 25 dims, side streams --------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_strided_views_over_many_blocks(dtype, device):
    # Every earlier strided view has < 65,536 elements (one block); these span 16 and 12 blocks.
    n = 3 * 2**20
    base_a, base_b = planted([n + 7, n + 5], dtype, device, seed=21)
    view_a = base_a[::3]                               # 1D, stride 3
    view_b = base_b[:n].view(-1, 1024)[:, 1::2]        # 2D, odd columns
    view_a[5 * CHUNK + 1] = math.nan
    view_b[700, 300] = -math.inf
    idx = torch.arange(n + 7)
    outside_a = (idx % 3 != 0).to(device)
    idx = torch.arange(n + 5)
    outside_b = ((idx >= n) | (idx % 2 == 0)).to(device)
    before_a, before_b = base_a[outside_a].clone(), base_b[outside_b].clone()
    scale = torch.tensor(0.37, device=device)
    ext_a, ref_a = _scaled_cpu([view_a], scale)
    want_b = view_b.cpu()
    if BACKEND["cpu"] == "extension":
        maybe_scale_op([want_b], scale.cpu())
    else:
        want_b.mul_(scale.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32))
    scale_op([view_a], scale)
    maybe_scale_op([view_b], scale)
    torch.testing.assert_close(view_a.cpu(), ref_a[0], rtol=_SCALE_TOL[dtype], atol=_scale_atol(dtype))
    torch.testing.assert_close(view_b.cpu(), want_b, rtol=_SCALE_TOL[dtype], atol=_scale_atol(dtype), equal_nan=True)
    assert torch.isfinite(view_a).all()  # zero_nonfinite_and_scale_ zeroed the NaN
    assert torch.isinf(view_b[700, 300])  # maybe_scale_ scales non-finite values as they are
    if ext_a is not None:
        assert_bits_equal(view_a, ext_a[0], "zero_nonfinite_and_scale_ on a strided view vs the CPU kernel")
    assert_bits_equal(base_a[outside_a], before_a, "elements outside the stride-3 view")
    assert_bits_equal(base_b[outside_b], before_b, "elements outside the odd-column view")


def _over_25_dims(device, dtype=torch.float32):
    """A view with 26 dims of size 2 that no two of which merge (strides 2^(k+1) - 1): what the
    CUDA kernels' argument table cannot describe, so they take their copy fallback."""
    strides = [2 ** (k + 1) - 1 for k in range(26)][::-1]
    base = torch.randn(sum(strides) + 1, device=device, dtype=dtype)
    view = base.as_strided([2] * 26, strides)
    view[(1,) + (0,) * 25] = math.nan
    view[(1,) * 26] = math.inf
    view[(0,) * 25 + (1,)] = -0.0
    return base, view


def _on_host(base, view):
    # torch's own CUDA copy refuses a view of more than 25 dims it cannot merge (view.cpu() would
    # raise "tensor has too many (>25) dims"): the same view of a host copy of its storage.
    return base.cpu().as_strided(view.shape, view.stride(), view.storage_offset())


@needs_gpu
@pytest.mark.parametrize("op", [scale_op, maybe_scale_op], ids=["zero_nonfinite_and_scale_", "maybe_scale_"])
def test_scale_a_copied_view_sharing_memory_is_scaled_in_list_order(op):
    # The CUDA kernel scales a view of more than 25 dims through a copy: written back after every
    # other tensor, it overwrote what they had scaled ([base, view] gave x*2, not x*4 where they
    # meet). (The CPU kernel walks any view in place; a 26-dim view needs 2^27 elements: 50 s.)
    device = "cuda"
    base, view = _over_25_dims(device)
    base.nan_to_num_(nan=1.0, posinf=1.0)
    for lst in ([view, view], [base, view], [view, base]):
        want = _on_host(base, view).clone() * 4
        op(lst, torch.tensor(2.0, device=device))
        assert torch.equal(_on_host(base, view), want)


@needs_gpu
def test_stats_and_scale_views_over_25_dims():
    base, view = _over_25_dims("cuda")
    host = _on_host(base, view)
    got, ref = stats_op([view], 2.0), reference.multi_tensor_stats([host], 2.0)
    assert_stats_close(got, ref, torch.float32, 2.0, "26-dim view")
    assert int(got[1]) == 1 and int(got[2]) == 1
    gap = base[2].clone()  # offset 2 is no sum of distinct strides 1, 3, 7, ...: not in the view
    scale = torch.tensor(0.5, device="cuda")
    ext, want = _scaled_cpu([host], scale)
    scale_op([view], scale)
    # x 0.5 is exact
    assert_bits_equal(_on_host(base, view), want[0], "zero_nonfinite_and_scale_ on a 26-dim view")
    assert_bits_equal(base[2], gap, "storage outside the 26-dim view")
    before = _on_host(base, view)
    maybe_scale_op([view], torch.tensor(2.0, device="cuda"))
    assert_bits_equal(_on_host(base, view), before * 2.0, "maybe_scale_ on a 26-dim view")


@needs_gpu
def test_scale_kernels_use_the_current_stream():
    s = torch.cuda.Stream()
    x = torch.randn(3 * CHUNK + 5, device="cuda")
    y = torch.randn(2 * CHUNK, device="cuda")[::2]
    want_x, want_y = (x.double() * 2.0 * 0.25).float(), (y.double() * 2.0 * 0.5).float()
    scale_q, scale_h = torch.tensor(0.25, device="cuda"), torch.tensor(0.5, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # a kernel on the default stream would run before the mul_
        x.mul_(2.0)
        y.mul_(2.0)
        scale_op([x], scale_q)
        maybe_scale_op([y], scale_h)
    s.synchronize()
    assert_bits_equal(x, want_x, "zero_nonfinite_and_scale_ on a side stream")
    assert_bits_equal(y, want_y, "maybe_scale_ on a side stream")


# --- CUDA graphs: many launches, a device scale of 1 --------------------------------------------


def _warm_then_capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@needs_gpu
def test_graph_capture_with_more_tensors_than_one_launch():
    # 2,500 tensors: the stats kernel needs three launches (1000 tensors each), the scale kernel
    # many more (140 each); all of them must be captured and replayed.
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 4000, (2500,), generator=g).tolist()
    ts = planted(sizes, torch.float32, "cuda", seed=6)
    fresh = planted(sizes, torch.float32, "cuda", seed=7)
    scale = torch.tensor(0.5, device="cuda")

    def step():
        out = stats_op(ts, 2.0)
        scale_op(ts, scale)
        return out

    graph, out = _warm_then_capture(step)
    for t, f in zip(ts, fresh):
        t.copy_(f)
    want_stats = reference.multi_tensor_stats([f.cpu() for f in fresh], 2.0)
    _, want_scaled = _scaled_cpu(fresh, scale)
    graph.replay()
    torch.cuda.synchronize()
    assert_stats_close(out, want_stats, torch.float32, 2.0, "replayed stats over 2,500 tensors")
    for i, (t, w) in enumerate(zip(ts, want_scaled)):
        assert_bits_equal(t, w, f"replayed scale, tensor {i}")  # x 0.5 is exact


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_device_scale_of_one_writes_nothing_inside_a_replay(dtype):
    x = torch.randn(3 * CHUNK + 9, device="cuda").to(dtype)
    x.view(BITS[dtype])[3] = PAYLOAD_NAN[dtype]
    x[5] = -0.0
    x[CHUNK + 1] = math.inf
    y = torch.randn(2 * CHUNK + 3, device="cuda").to(dtype)[::2]  # a strided second entry
    scale = torch.tensor(0.5, device="cuda")
    graph, _ = _warm_then_capture(lambda: maybe_scale_op([x, y], scale))
    x.view(BITS[dtype])[3] = PAYLOAD_NAN[dtype]  # the warm-up ran at 0.5: plant the payload again
    before_x, before_y = x.view(BITS[dtype]).clone(), y.view(BITS[dtype]).clone()
    scale.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x.view(BITS[dtype]), before_x), "a device scale of 1 rewrote bits inside the replay"
    assert torch.equal(y.view(BITS[dtype]), before_y), "a device scale of 1 rewrote a strided tensor's bits"
    scale.fill_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    # x 0.5 in float, rounded once to the dtype: what multiplying in the dtype gives too
    assert_bits_equal(x, before_x.view(dtype) * 0.5, "replay at scale 0.5")
    assert_bits_equal(y, before_y.view(dtype) * 0.5, "replay at scale 0.5, strided")


# --- safe math through the public API on CUDA -----------------------------------------------------

needs_gpu_safe_math = pytest.mark.skipif(not (HAS_GPU and HAS_SAFE_MATH), reason="needs a CUDA GPU and the safe math ops")


@needs_gpu
@needs_gpu_safe_math
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_safe_math_public_api_cuda_matches_cpu(dtype):
    x = _special(dtype)
    pos = x.abs()
    for name, fn in (("safe_log", lambda t: gradguard.safe_log(t)), ("safe_exp", lambda t: gradguard.safe_exp(t)),
                     ("safe_sqrt", lambda t: gradguard.safe_sqrt(t))):
        for arg in (x, pos, x[::3], x[11]):
            got, cpu = fn(arg), fn(arg.cpu())
            assert got.device.type == "cuda" and got.dtype == cpu.dtype
            if name == "safe_sqrt":  # correctly rounded on every device
                assert_bits_equal(got, cpu, f"{name} CUDA vs CPU")
            else:
                torch.testing.assert_close(got.cpu(), cpu, rtol=libm_rtol(dtype), atol=torch.finfo(dtype).tiny,
                                           equal_nan=True, msg=lambda m: f"{name}: {m}")
    # other as a CUDA tensor, a CPU 0-dim tensor (as torch.div takes one), a number, broadcast
    den = _special(dtype, seed=4)
    den[::5] = 0.0
    for other in (den, torch.tensor(0.0), torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64), 3.0, 0.0,
                  den[:1], torch.tensor(2.5, device="cuda")):
        got = gradguard.safe_div(x, other, fill=-1.0)
        cpu_other = other.cpu() if isinstance(other, torch.Tensor) else other
        want = gradguard.safe_div(x.cpu(), cpu_other, fill=-1.0)
        what = f"safe_div by {type(other).__name__} {getattr(other, 'shape', other)}"
        assert got.device.type == "cuda" and got.dtype == want.dtype, what
        if other is den:  # tensor / tensor: IEEE division on both devices
            assert_bits_equal(got, want, what)
        else:  # torch's CUDA division by a scalar multiplies by its reciprocal: an ulp apart
            torch.testing.assert_close(got.cpu(), want, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny,
                                       equal_nan=True, msg=lambda m: f"{what}: {m}")
    # gradients through autograd, CUDA vs CPU
    xr = (x.abs() + 0.5).float().requires_grad_()
    xc = xr.detach().cpu().requires_grad_()
    for fn in (gradguard.safe_log, gradguard.safe_sqrt, lambda t: gradguard.safe_div(t, torch.tensor(0.0))):
        (gg,) = torch.autograd.grad(fn(xr).sum(), xr)
        (gc,) = torch.autograd.grad(fn(xc).sum(), xc)
        torch.testing.assert_close(gg.cpu(), gc, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


@needs_gpu
@needs_gpu_safe_math
def test_safe_math_public_api_has_no_host_sync():
    x = (torch.rand(4099, device="cuda") + 0.1).requires_grad_()
    cpu_scalar = torch.tensor(2.0)  # torch.div takes a CPU 0-dim divisor as a kernel argument, no copy

    def run():
        y = gradguard.safe_log(x) + gradguard.safe_exp(x) + gradguard.safe_sqrt(x)
        y = y + gradguard.safe_div(x, x - 0.5) + gradguard.safe_div(x, 2.0) + gradguard.safe_div(x, cpu_scalar)
        y.sum().backward()

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@needs_gpu_safe_math
def test_safe_math_public_api_under_graph_capture():
    x = torch.rand(3 * CHUNK, device="cuda") + 0.1
    d = torch.randn(3 * CHUNK, device="cuda")

    def fn():
        return (gradguard.safe_log(x), gradguard.safe_exp(x, 5.0), gradguard.safe_sqrt(x),
                gradguard.safe_div(x, d, eps=1e-3, fill=7.0), gradguard.safe_div(x, 4.0))

    graph, outs = _warm_then_capture(fn)
    x.copy_(torch.rand(3 * CHUNK, device="cuda") * 10)
    x[::97] = 0.0
    d.copy_(torch.randn(3 * CHUNK, device="cuda"))
    d[::13] = 0.0
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, fn()):
        assert_bits_equal(got, want, "replayed safe math vs eager")


# --- GradGuard on CUDA end to end -----------------------------------------------------------------

from optim_util import TinyNet, assert_bit_identical, snapshot  # noqa: E402

FUSED = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


def _batch(i, device="cuda"):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(64, 8, generator=g).to(device), torch.randn(64, 1, generator=g).to(device)


@needs_gpu
@pytest.mark.parametrize("name", sorted(FUSED))
def test_guard_fused_on_cuda_matches_clip_and_skips_bit_identically(name):
    # The guard steps a fused optimizer through found_inf/grad_scale on the device; the
    # reference is the same optimizer with torch's clip_grad_norm_ and the bad step left out.
    torch.manual_seed(0)
    model = TinyNet().cuda()
    ref_model = TinyNet().cuda()
    ref_model.load_state_dict(model.state_dict())
    guard = gradguard.GradGuard(FUSED[name](model.parameters()), max_norm=0.5, model=model)
    ref_opt = FUSED[name](ref_model.parameters())
    reports = []
    guard.add_step_hook(lambda g, rep: reports.append(rep))
    poisoned = 2
    for i in range(5):
        x, y = _batch(i)
        for m, opt in ((model, guard), (ref_model, ref_opt)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        if i == poisoned:
            model.fc1.weight.grad[0, 0] = math.nan
        before = snapshot(list(model.parameters()), guard.optimizer)
        guard.step()
        if i == poisoned:
            assert_bit_identical(before, snapshot(list(model.parameters()), guard.optimizer))
        else:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
            ref_opt.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [bool(r.skipped) for r in reports] == [i == poisoned for i in range(5)]
    assert reports[poisoned].as_dict()["nonfinite_layers"] == ["fc1.weight"]


@needs_gpu
@pytest.mark.parametrize("name", sorted(FUSED))
def test_guarded_fused_step_on_cuda_has_no_host_sync(name):
    torch.manual_seed(0)
    model = TinyNet().cuda()
    guard = gradguard.GradGuard(FUSED[name](model.parameters()), max_norm=1.0, model=model)
    batches = [_batch(i) for i in range(4)]  # host-to-device copies of pageable memory sync

    def step(i):
        x, y = batches[i]
        guard.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if i == 2:
            model.fc2.bias.grad.fill_(math.inf)
        guard.step()

    step(0)  # optimizer state and lazy CUDA initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in (1, 2, 3):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [bool(s) for s in guard.history.as_dict()["skipped"]] == [False, False, True, False]


@needs_gpu
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_guard_with_grad_scaler_and_fp16_autocast_on_cuda(name):
    # No clipping: the guard hands GradScaler's scale and flag to the fused step, so the run
    # follows the unguarded GradScaler loop, the overflow step (skipped, scale halved) included.
    def run(guarded):
        torch.manual_seed(0)
        model = TinyNet().cuda()
        inner = FUSED[name](model.parameters())
        opt = gradguard.GradGuard(inner, model=model) if guarded else inner
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
        scales, snaps = [], []
        for i in range(6):
            x, y = _batch(i)
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            if i == 3:
                loss = loss * math.inf  # an fp16 overflow in backward, as the scaler sees it
            before = snapshot(list(model.parameters()), inner)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            if i == 3:
                assert_bit_identical(before, snapshot(list(model.parameters()), inner))
            snaps.append([p.detach().clone() for p in model.parameters()])
        return scales, snaps

    scales, snaps = run(True)
    bare_scales, bare_snaps = run(False)
    assert scales == bare_scales and scales[3] == scales[2] / 2
    for a, b in zip(snaps, bare_snaps):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --- the benchmark entry point without a GPU ------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
def test_bench_only_cuda_without_gpu_fails_with_one_clear_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gradguard.bench", "--only", "cuda", "--quick"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--only cuda needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@needs_gpu
def test_a_cpu_max_norm_tensor_steps_as_the_number_without_a_copy(monkeypatch):
    # A CPU-tensor max_norm was copied to the GPU with .to() every step: a blocking copy from
    # pageable memory, a host sync per step. Its value is now read (free) and filled on the device.
    torch.manual_seed(0)
    ws = [torch.randn(64, 32, device="cuda", requires_grad=True) for _ in range(3)]
    vs = [w.detach().clone().requires_grad_() for w in ws]
    a = gradguard.GradGuard(torch.optim.AdamW(ws, lr=1e-2, fused=True), max_norm=torch.tensor(0.5))
    b = gradguard.GradGuard(torch.optim.AdamW(vs, lr=1e-2, fused=True), max_norm=0.5)
    for step in range(3):
        grads = [torch.randn(64, 32, device="cuda") * 10 for _ in ws]
        for w, v, g in zip(ws, vs, grads):
            w.grad, v.grad = g.clone(), g.clone()
        b.step()
        real_to = torch.Tensor.to
        copies = []

        def to(self, *args, **kwargs):
            if self.device.type == "cpu" and any("cuda" in str(x) for x in list(args) + list(kwargs.values())):
                copies.append(self.shape)
            return real_to(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        a.step()
        monkeypatch.setattr(torch.Tensor, "to", real_to)
        assert not copies, copies
    for w, v in zip(ws, vs):
        assert torch.equal(w, v)

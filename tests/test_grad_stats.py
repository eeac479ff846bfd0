"""grad_stats / all_finite / the multi_tensor_stats op: kernels vs reference vs float64 math."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard
from gradguard import reference
from conftest import EXT_LOADED, FLOAT_DTYPES, needs_ext, run_under_isa, stats_paths

NAN, INF = math.nan, math.inf
CHUNK = 1 << 16  # the CPU kernel's chunk; NaN/Inf are planted around it
NORM_TYPES = [1.0, 2.0, INF, 0.5, 3.0]


def math_stats(tensors, p):
    """Independent float64 math: (norms, nan, inf, amax, total, found_inf) as Python lists/floats."""
    norms, nans, infs, amaxs, finite_parts = [], [], [], [], []
    for t in tensors:
        x = t.detach().double().reshape(-1)
        fin = x[torch.isfinite(x)].abs()
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        norm = float(torch.linalg.vector_norm(fin, ord=p)) if fin.numel() else 0.0
        finite_parts.append(fin)
        norms.append(NAN if n_nan else INF if n_inf else norm)
        nans.append(n_nan)
        infs.append(n_inf)
        amaxs.append(float(fin.max()) if fin.numel() else 0.0)
    allfin = torch.cat(finite_parts) if finite_parts else torch.zeros(0, dtype=torch.float64)
    total = float(torch.linalg.vector_norm(allfin, ord=p)) if allfin.numel() else 0.0
    total = NAN if sum(nans) else INF if sum(infs) else total
    return norms, nans, infs, amaxs, total, float(sum(nans) + sum(infs) > 0)


def assert_matches_math(stats, tensors, p, rtol=1e-6):
    norms, nans, infs, amaxs, total, found = math_stats(tensors, p)
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    assert stats.norms.dtype == out_dtype and stats.amax.dtype == out_dtype and stats.total_norm.dtype == out_dtype
    assert stats.nan_count.dtype == torch.int64 and stats.inf_count.dtype == torch.int64
    assert stats.found_inf.dtype == torch.float32 and stats.found_inf.dim() == 0 and stats.total_norm.dim() == 0
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(stats.norms.double(), torch.tensor(norms, **f64), rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(stats.amax.double(), torch.tensor(amaxs, **f64), rtol=1e-7, atol=0)
    assert stats.nan_count.tolist() == nans
    assert stats.inf_count.tolist() == infs
    torch.testing.assert_close(stats.total_norm.double(), torch.tensor(total, **f64), rtol=rtol, atol=0, equal_nan=True)
    assert stats.found_inf.item() == found


def layouts(dtype, n=1000, seed=0):
    """Contiguous, transposed, strided, offset, 0-d, empty and odd-sized tensors of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    m = torch.randn(37, 29, generator=g).to(dtype)
    cube = torch.randn(6, 7, 9, generator=g).to(dtype)
    return {
        "contiguous": base,
        "transposed": m.t(),
        "step2": base[::2],
        "offset_odd": base[3:700],
        "column": m[:, 5],
        "permuted": cube.permute(2, 0, 1),
        "sliced3d": cube[1:5, ::2, 3:],
        "expanded": torch.randn(1, 13, generator=g).to(dtype).expand(17, 13),
        "zero_dim": torch.tensor(-2.5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "tail7": torch.randn(7, generator=g).to(dtype),
        "tail257": torch.randn(257, generator=g).to(dtype),
    }


TOL = {torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_stats_matches_float64_math_over_layouts(dtype, p):
    ts = list(layouts(dtype).values())
    assert_matches_math(gradguard.grad_stats(ts, p), ts, p, rtol=TOL[dtype] * (10 if p not in (1.0, 2.0, INF) else 1))


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", list(layouts(torch.float32).keys()))
def test_each_kernel_matches_reference_per_layout(path, dtype, layout):
    fn = dict(stats_paths())[path]
    t = layouts(dtype)[layout]
    for p in NORM_TYPES:
        got = fn([t], p)
        want = reference.multi_tensor_stats([t.contiguous()], p)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_tail_length_matches_reference(path, dtype):
    # The CPU loop takes 64 elements a step (AVX-512), then 32, then 8, then the last few through a
    # zero-padded copy: every length up to 150, the largest element placed at the end (in the
    # padded part), and lengths with a NaN last.
    fn = dict(stats_paths())[path]
    g = torch.Generator().manual_seed(3)
    ts = []
    for n in range(1, 151):
        t = torch.rand(n, generator=g) + 0.5
        t[-1] = -4.0 if n % 2 else 4.0
        ts.append(t.to(dtype))
    ts += [torch.cat([torch.ones(n - 1), torch.tensor([NAN])]).to(dtype) for n in (9, 17, 40, 64, 130)]
    for p in NORM_TYPES:
        got = fn(ts, p)
        want = reference.multi_tensor_stats(ts, p)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def binade_tensors(dtype):
    """One tensor per exponent of a 16-bit dtype: every mantissa of that exponent, both signs,
    shuffled, repeated to 4 copies (so the kernel's 32-element loop, not only its tail, sees it)."""
    bits_per_mantissa = 7 if dtype == torch.bfloat16 else 10
    n_exp = (1 << (15 - bits_per_mantissa)) - 1  # the all-ones exponent is Inf/NaN
    g = torch.Generator().manual_seed(5)
    out = []
    for e in range(n_exp):
        words = (e << bits_per_mantissa) + torch.arange(1 << bits_per_mantissa, dtype=torch.int32)
        words = torch.cat([words, words | 0x8000]).repeat(4)
        words = words[torch.randperm(words.numel(), generator=g)]
        out.append(words.to(torch.int16).view(dtype))
    return out


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_squares_are_exact_in_every_binade(path, dtype):
    # The float16/bfloat16 square loops build their doubles from the bits (a shift, a mask and an
    # exponent rebias per lane): a wrong shift or bias shows in some binade, so every binade is a
    # tensor of its own and the kernel is held to double rounding, not the 1e-6 of the others. The
    # mixes: subnormals beside 1.0 and beside 2^-60 (bfloat16: the fast loop, whose subnormal
    # products are off by <= 2^-252), beside a tiny normal (below 2^-60: the exact loop), all
    # patterns at once.
    fn = dict(stats_paths())[path]
    ts = binade_tensors(dtype)
    sub, tiny_normal = ts[0], ts[1]
    # The large element first: the 32-element loop takes the first 1024 elements, the tail the rest.
    at_threshold = torch.tensor([2.0 ** -60], dtype=dtype)
    ts += [torch.cat([torch.tensor([1.0], dtype=dtype), sub]), torch.cat([at_threshold, sub]),
           torch.cat([tiny_normal[:5], sub]), torch.cat(binade_tensors(dtype))]
    x = [t.double() for t in ts]
    want = torch.stack([torch.linalg.vector_norm(v) for v in x])
    for p in (2.0, INF):
        acc, nan, inf, amax = fn(ts, p)  # acc: the sum of (|x| / amax)^p (see reference.multi_tensor_stats)
        assert nan.sum().item() == 0 and inf.sum().item() == 0
        torch.testing.assert_close(amax, torch.stack([v.abs().max() for v in x]), rtol=0, atol=0)
        if p == 2.0:
            # The reference's row path sums float32 squares by torch's cascade (~1e-7, its docstring).
            rtol = 1e-6 if path == "reference" else 2e-12
            torch.testing.assert_close(torch.sqrt(acc) * amax, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_zeros_and_subnormals_are_exact(path, dtype):
    # The AVX-512 bfloat16 loop gives a zero or subnormal word a leading 1 it lacks (a square
    # below 2^-252); it must not show: an all-zero segment sums to 0, a subnormal among zeros
    # (below 2^-60: the segment is summed again) is its own norm, and 1.0 among zeros is 1.0.
    # Exact equality: a spurious 2^-252 shows against a sum of 2^-200.
    fn = dict(stats_paths())[path]
    sub = torch.tensor([0], dtype=torch.int16).add_(3).view(dtype)  # the third-smallest subnormal

    def among_zeros(value, where):
        t = torch.zeros(4096, dtype=dtype)
        t[where] = value
        return t

    # The kernel's segments are 4096 elements: an all-zero one beside a tiny one (summed exactly)
    # would add its zeros' squares to the tiny sum.
    tiny = 2.0 ** -100 if dtype == torch.bfloat16 else float(sub)
    two_segments = torch.cat([torch.zeros(4096, dtype=dtype), among_zeros(tiny, 100)])
    ts = [torch.zeros(4096, dtype=dtype), among_zeros(sub, 100), among_zeros(-sub, 4095), among_zeros(1.0, 7),
          among_zeros(2.0 ** -14, 64), two_segments]
    want = [0.0, float(sub), float(sub), 1.0, 2.0 ** -14, tiny]
    for p in (1.0, 2.0, INF):
        acc, nan, inf, amax = fn(ts, p)  # acc: the sum of (|x| / amax)^p
        assert nan.sum().item() == 0 and inf.sum().item() == 0
        assert amax.double().tolist() == want
        assert acc[0].item() == 0.0
        norms = torch.where(amax > 0, acc.double() ** (1 / p) * amax.double(), 0.0) if p != INF else amax.double()
        assert norms.tolist() == want


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_subnormal_16bit_gradients_take_no_slow_path(dtype):
    # Intel cores take a microcode assist for each subnormal double operand: the bfloat16 square
    # loop made one per subnormal element, and a list of subnormals took 60x a list of normals
    # (2026-12-07, Intel Xeon; AMD cores show no such cost, so there this passes either way; the
    # float16 case guards the loops that never made subnormal doubles).
    import time

    g = torch.Generator().manual_seed(0)
    tiny = 1e-39 if dtype == torch.bfloat16 else 1e-6  # below each format's smallest normal
    normal = (torch.rand(1 << 19, generator=g, dtype=torch.float64) + 0.25).to(dtype)
    subnormal = ((torch.rand(1 << 19, generator=g, dtype=torch.float64) + 0.25) * tiny).to(dtype)
    assert subnormal.abs().max() < torch.finfo(dtype).tiny

    def timed(t):
        start = time.perf_counter()
        torch.ops.gradguard.multi_tensor_stats([t], 2.0)
        return time.perf_counter() - start

    # Alternated, so that a change in the machine's load moves both alike; median of the ratios.
    ratios = sorted(timed(subnormal) / timed(normal) for _ in range(15))
    ratio = ratios[7]
    assert ratio < 6, f"subnormal {dtype} list took {ratio:.1f}x a normal one"


def planted(dtype, value, where, n=3 * CHUNK + 300):
    """A tensor of n random values with `value` written at position `where` (may be a list)."""
    t = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    for w in (where if isinstance(where, list) else [where]):
        t[w] = value
    return t


POSITIONS = {
    "first": 0,
    "vector_lane": 3,
    "block_edge": 255,
    "chunk_last": CHUNK - 1,
    "chunk_first": CHUNK,
    "remainder_tail": 3 * CHUNK + 299,
}


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("pos", list(POSITIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_planted_anywhere_is_counted(dtype, pos, value):
    t = planted(dtype, value, POSITIONS[pos])
    other = torch.randn(5, dtype=dtype)
    ts = [other, t, t[::3], other]
    s = gradguard.grad_stats(ts)
    assert_matches_math(s, ts, 2.0)
    assert s.found_inf.item() == 1.0
    assert not gradguard.all_finite(ts).item()
    expect = torch.tensor([False, True, POSITIONS[pos] % 3 == 0, False])
    assert torch.equal(s.nan_count > 0, expect if math.isnan(value) else torch.zeros(4, dtype=torch.bool))
    assert torch.equal(s.inf_count > 0, expect if math.isinf(value) else torch.zeros(4, dtype=torch.bool))


def test_nonfinite_in_last_element_of_last_tensor():
    ts = [torch.randn(100) for _ in range(5)]
    ts[-1][-1] = NAN
    s = gradguard.grad_stats(ts)
    assert s.nan_count.tolist() == [0, 0, 0, 0, 1] and s.found_inf.item() == 1.0 and math.isnan(s.total_norm.item())


def test_nan_wins_over_inf_and_counts_are_exact():
    t = torch.tensor([1.0, NAN, INF, -INF, NAN, 2.0])
    s = gradguard.grad_stats([t, torch.tensor([INF, 3.0])])
    assert s.nan_count.tolist() == [2, 0] and s.inf_count.tolist() == [2, 1]
    assert math.isnan(s.norms[0].item()) and s.norms[1].item() == INF
    assert s.amax.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("p", [1.0, 2.0, INF])
def test_huge_finite_float32_does_not_overflow(p):
    t = torch.tensor([1e20, -1e20, 3.0e38, 1.0], dtype=torch.float32)
    s = gradguard.grad_stats([t], p)
    assert s.found_inf.item() == 0.0 and s.nan_count.sum() == 0 and s.inf_count.sum() == 0
    assert_matches_math(s, [t], p)
    s1 = gradguard.grad_stats([torch.full((1000,), 1e20)])
    torch.testing.assert_close(s1.total_norm, torch.tensor(1e20 * math.sqrt(1000)), rtol=1e-6, atol=0)


# float64 input is summed in float64 like the math it is compared with: squares below ~1e-308
# underflow there too, which the API documents; narrower dtypes must not lose anything.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_denormals_and_tiny_values_keep_relative_precision(dtype):
    tiny = torch.finfo(dtype).tiny
    t = torch.full((3000,), tiny / 4, dtype=dtype)  # subnormal
    t[::7] = tiny * 3
    s = gradguard.grad_stats([t])
    assert s.total_norm.item() > 0
    assert_matches_math(s, [t], 2.0, rtol=1e-5 if dtype == torch.float16 else 1e-6)


def test_negative_zero_and_all_zero():
    s = gradguard.grad_stats([torch.tensor([-0.0, 0.0, -0.0]), torch.zeros(10)])
    assert s.norms.tolist() == [0.0, 0.0] and s.amax.tolist() == [0.0, 0.0] and s.total_norm.item() == 0.0
    assert s.found_inf.item() == 0.0


def test_mixed_dtypes_keep_input_order_and_widen_to_float64():
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(50, generator=g).half(), torch.randn(40, generator=g, dtype=torch.float64),
          torch.randn(30, generator=g), torch.randn(20, generator=g).bfloat16(), torch.randn(10, generator=g).half(),
          torch.randn(5, generator=g)]
    s = gradguard.grad_stats(ts)
    assert s.norms.dtype == torch.float64
    assert_matches_math(s, ts, 2.0)
    s32 = gradguard.grad_stats([ts[0], ts[2], ts[3]])
    assert s32.norms.dtype == torch.float32
    assert_matches_math(s32, [ts[0], ts[2], ts[3]], 2.0)


def test_one_kernel_call_per_device_dtype_group(monkeypatch):
    calls = []
    real = torch.ops.gradguard.multi_tensor_stats

    class Spy:
        def __call__(self, tensors, p):
            calls.append((tensors[0].dtype, len(tensors)))
            return real(tensors, p)

    monkeypatch.setattr(torch.ops.gradguard, "multi_tensor_stats", Spy())
    ts = [torch.randn(3), torch.randn(3).half(), torch.randn(3), torch.randn(3).half(), torch.randn(3)]
    gradguard.grad_stats(ts)
    assert calls == [(torch.float32, 3), (torch.float16, 2)]


def test_empty_iterable():
    s = gradguard.grad_stats(iter([]))
    assert s.norms.shape == (0,) and s.nan_count.shape == (0,) and s.amax.shape == (0,)
    assert s.total_norm.item() == 0.0 and s.found_inf.item() == 0.0 and s.found_inf.dtype == torch.float32
    assert gradguard.all_finite([]).item() is True


def test_single_tensor_and_generator_inputs():
    t = torch.randn(10)
    a = gradguard.grad_stats(t)
    b = gradguard.grad_stats(x for x in [t])
    assert torch.equal(a.norms, b.norms) and a.norms.shape == (1,)


def test_sparse_coo_uses_coalesced_values_and_complex_uses_abs():
    i = torch.tensor([[0, 1, 1, 3], [2, 0, 0, 1]])
    v = torch.tensor([3.0, 1.0, 2.0, -4.0])
    sp = torch.sparse_coo_tensor(i, v, (4, 3))  # duplicate (1, 0) sums to 3
    dense = sp.to_dense()
    s = gradguard.grad_stats([sp])
    torch.testing.assert_close(s.norms, torch.linalg.vector_norm(dense).reshape(1))
    z = torch.tensor([3 + 4j, -1j, 0j], dtype=torch.complex64)
    sz = gradguard.grad_stats([z], 1.0)
    torch.testing.assert_close(sz.norms, torch.tensor([6.0]))
    assert sz.amax.item() == 5.0


@pytest.mark.parametrize("bad, kind", [
    (None, "NoneType"), (3.0, "float"), ("x", "str"),
])
def test_non_tensor_entries_raise_type_error_naming_position(bad, kind):
    with pytest.raises(TypeError, match=rf"tensors\[1\] is a {kind}"):
        gradguard.grad_stats([torch.randn(2), bad])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_raise_type_error(dtype):
    with pytest.raises(TypeError, match=rf"tensors\[0\] has dtype {dtype}"):
        gradguard.all_finite([torch.zeros(3, dtype=dtype)])


@pytest.mark.parametrize("p", [0, -1.0, NAN, "2", None, True])
def test_bad_norm_type_raises_value_error(p):
    with pytest.raises(ValueError, match="norm_type"):
        gradguard.grad_stats([torch.randn(3)], p)


@needs_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, INF])
def test_cpu_kernel_is_deterministic_across_thread_counts(dtype, p):
    # One thread takes the kernel's tensor-by-tensor path, two and three its work-list path (the
    # list is large enough, 2.5 MB even in float16, that threads_for in grad_stats_cpu.cpp gives
    # it three): the same chunks merged in the same order, so the same bits (tails of every
    # length, a transposed and a strided view, and a tensor with a NaN included).
    ts = [torch.randn(5 * CHUNK + 17), torch.randn(300, 301).t(), torch.randn(CHUNK * 2)[::2], torch.randn(12 * CHUNK),
          *(torch.randn(k) for k in range(1, 40)), torch.tensor([1.0, NAN, 2.0, -INF] * 5)]
    ts = [t.to(dtype) for t in ts]
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.gradguard.multi_tensor_stats(ts, p))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_float32_precision_on_2_to_28_elements():
    n = 1 << 28
    t = torch.empty(n, dtype=torch.float32).uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    s = gradguard.grad_stats([t, t[: n // 3]])
    want = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64),
                        torch.linalg.vector_norm(t[: n // 3], dtype=torch.float64)])
    torch.testing.assert_close(s.norms.double(), want, rtol=1e-6, atol=0)


@needs_ext
def test_more_than_2_to_31_elements_expanded_view():
    n = (1 << 31) + 7
    ones = torch.ones(1).expand(n)
    s = gradguard.grad_stats([ones])
    torch.testing.assert_close(s.norms, torch.tensor([math.sqrt(n)]), rtol=1e-6, atol=0)
    nans = torch.full((1,), NAN).expand(n)
    s2 = gradguard.grad_stats([nans], 1.0)
    assert s2.nan_count.item() == n and s2.inf_count.item() == 0  # counts past int32


@pytest.mark.slow
@needs_ext
def test_more_than_2_to_31_elements_real_float16_tensor():
    n = (1 << 31) + 9
    t = torch.zeros(n, dtype=torch.float16)
    t[-1] = NAN
    t[(1 << 31) + 1] = 2.0
    t[5] = -INF
    t[(1 << 31) - 1] = 3.0
    s = gradguard.grad_stats([t])
    assert s.nan_count.item() == 1 and s.inf_count.item() == 1
    assert s.amax.item() == 3.0
    raw = torch.ops.gradguard.multi_tensor_stats([t], 2.0)
    assert raw[0].item() == 13.0 / 9.0  # normalized by amax (see the schema in gradguard._ops)
    del t


def test_opcheck_multi_tensor_stats():
    ts = [torch.randn(100), torch.randn(5, 7).t(), torch.tensor(2.0)]
    torch.library.opcheck(torch.ops.gradguard.multi_tensor_stats.default, (ts, 2.0))
    torch.library.opcheck(torch.ops.gradguard.multi_tensor_stats.default, ([torch.randn(9).half()], INF))


def test_stats_outputs_never_require_grad():
    # The op is not differentiable and falls through the Autograd key on both kernel paths: its
    # outputs must not require grad (nor carry a grad_fn) even when the inputs do.
    ts = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    with torch.enable_grad():
        out = torch.ops.gradguard.multi_tensor_stats.default(ts, 2.0)
    assert all(not o.requires_grad and o.grad_fn is None for o in out)
    torch.library.opcheck(torch.ops.gradguard.multi_tensor_stats.default, (ts, 2.0))


def test_opcheck_zero_nonfinite_and_scale():
    ts = [torch.tensor([1.0, NAN, -INF, 4.0]), torch.randn(5, 7).t()]
    torch.library.opcheck(torch.ops.gradguard.zero_nonfinite_and_scale_.default, (ts, torch.tensor(0.5)))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(xs):
        s = gradguard.grad_stats(xs)
        return s.total_norm * 2, s.found_inf, gradguard.all_finite(xs)

    ts = [torch.randn(100), torch.randn(5, 7).t(), torch.randn(10).half()]
    total2, found, ok = f(ts)
    torch.testing.assert_close(total2, gradguard.grad_stats(ts).total_norm * 2)
    assert found.item() == 0.0 and ok.item()
    ts[0][3] = NAN
    total2, found, ok = f(ts)
    assert math.isnan(total2.item()) and found.item() == 1.0 and not ok.item()


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_a_tensor_max_norm_compiles_with_fullgraph_as_in_torch(fn):
    # torch's clip functions compile a 0-dim CPU tensor max_norm (a clipping schedule) with
    # fullgraph=True; gradguard's read it with float() while compiling: a data-dependent branch,
    # which fullgraph refused. Under compile the device checks it, as for an accelerator tensor:
    # a negative one leaves the gradients untouched.
    def run(clip_fn, total_fn, mn, compiled):
        ps = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
        for p in ps:
            p.grad = torch.ones_like(p)

        def f(limit):
            if fn == "clip_grad_norm_":
                return clip_fn(ps, limit)
            return clip_fn(ps, limit, total_fn([p.grad for p in ps]))

        if compiled:
            torch._dynamo.reset()
            f = torch.compile(f, backend="aot_eager", fullgraph=True)
        f(mn)
        return [p.grad for p in ps]

    ours = getattr(gradguard, fn), gradguard.get_total_norm
    theirs = getattr(torch.nn.utils, fn), torch.nn.utils.get_total_norm
    for mn in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)):
        want = run(*theirs, mn, compiled=False)
        for got in (run(*ours, mn, compiled=True), run(*ours, mn, compiled=False)):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
    for g in run(*ours, torch.tensor(-1.0), compiled=True):
        assert torch.equal(g, torch.ones_like(g))


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "grad_stats"])
def test_a_changing_norm_type_compiles_with_fullgraph_as_in_torch(fn):
    # At the second norm_type dynamo recompiles with the float symbolic; check_norm_type's
    # math.isnan(p) and float(p) did not trace there ("torch.* op returned non-Tensor"), while
    # torch's clip_grad_norm_ compiles it.
    def f(ps, p):
        if fn == "clip_grad_norm_":
            return gradguard.clip_grad_norm_(ps, 1.0, p)
        if fn == "get_total_norm":
            return gradguard.get_total_norm([q.grad for q in ps], p)
        return gradguard.grad_stats([q.grad for q in ps], p).total_norm

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for p in (2.0, 1.0, 3.0, INF, 0.5):
        ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
        for q, g in zip(ps, ([3.0, -4.0], [1.0, 0.5, -2.0])):
            q.grad = torch.tensor(g)
        want = torch.linalg.vector_norm(torch.tensor([3.0, -4.0, 1.0, 0.5, -2.0], dtype=torch.float64), p)
        got = compiled(ps, p)
        torch.testing.assert_close(got, want.to(got.dtype), msg=f"norm_type={p}")
        if fn == "clip_grad_norm_":
            torch.testing.assert_close(ps[0].grad, torch.tensor([3.0, -4.0]) / (want.float() + 1e-6))


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
def test_zero_nonfinite_and_scale_op(path):
    fn = {"reference": reference.zero_nonfinite_and_scale_,
          "dispatcher": torch.ops.gradguard.zero_nonfinite_and_scale_}[path]
    for dtype in FLOAT_DTYPES:
        src = layouts(dtype, seed=4)
        src["contiguous"][[0, 10, 999]] = torch.tensor([NAN, INF, -INF], dtype=dtype)
        ts = [v.clone() if k != "expanded" else v.contiguous() for k, v in src.items()]
        views = [ts[0], ts[1].t().t(), ts[2]]
        want = [torch.where(torch.isfinite(t), t * torch.tensor(0.25, dtype=dtype), torch.zeros((), dtype=dtype))
                for t in ts]
        fn(ts, torch.tensor(0.25))
        for got, w in zip(ts, want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
        assert views[0].data_ptr() == ts[0].data_ptr()
        m = torch.randn(8, 6, dtype=dtype)
        mv = m[:, ::2]  # non-dense view: only its elements change
        before = m.clone()
        fn([mv], torch.tensor(2.0))
        torch.testing.assert_close(m[:, ::2], before[:, ::2] * 2, rtol=0, atol=0)
        torch.testing.assert_close(m[:, 1::2], before[:, 1::2], rtol=0, atol=0)


@needs_ext
@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_zero_nonfinite_and_scale_on_any_thread_count(threads):
    # A list small enough to run on one thread and one large enough (14 MB moved) to be split
    # across threads (thread_count.h): every element scaled or zeroed exactly once either way.
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for ts in ([torch.randn(16) for _ in range(300)], [torch.randn(3 * CHUNK + 5) for _ in range(9)]):
            for t in ts:
                t[::7] = NAN
                t[3::11] = -INF
            want = [torch.where(torch.isfinite(t), t * 0.5, torch.zeros(())) for t in ts]
            torch.ops.gradguard.zero_nonfinite_and_scale_(ts, torch.tensor(0.5))
            for got, w in zip(ts, want):
                torch.testing.assert_close(got, w, rtol=0, atol=0)
    finally:
        torch.set_num_threads(old)


def _same_numbers(got, want):
    """Bit for bit, except that a NaN need only be a NaN (its payload is the kernel's own)."""
    nan = torch.isnan(want)
    iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    return torch.equal(torch.isnan(got), nan) and torch.equal(got.view(iv)[~nan], want.view(iv)[~nan])


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
def test_a_float64_scale_beyond_float32_multiplies_by_its_float32_rounding(path, dtype, op):
    # 1e39 rounds to float32 inf, by which every copy multiplies; torch's foreach branch of
    # maybe_scale_ (float32 without AVX-512, every dtype without AVX2: aarch64) raised "cannot be
    # converted to type float without overflow" instead (run there by _ISA_CHECK below).
    fn = getattr(reference if path == "reference" else torch.ops.gradguard, op)
    for scale, want in ((1e39, [math.inf, -math.inf, math.inf, 0.0]), (-1e39, [-math.inf, math.inf, -math.inf, -0.0]),
                        (1e-50, [0.0, -0.0, 0.0, 0.0])):
        x = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=dtype)
        fn([x], torch.tensor(scale, dtype=torch.float64))
        if scale == 1e39 or scale == -1e39:
            want = [math.nan if w == 0.0 else w for w in want]  # 0 * inf
        got = x.double()
        exp = torch.tensor(want, dtype=torch.float64)
        assert torch.equal(torch.isnan(got), torch.isnan(exp)), (scale, got)
        assert torch.equal(got[~exp.isnan()], exp[~exp.isnan()]), (scale, got)
        assert torch.equal(got.signbit()[~exp.isnan()], exp.signbit()[~exp.isnan()]), (scale, got)


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
def test_scaling_random_bit_patterns(path, dtype, op):
    # float32/float64 rows (an AVX2 loop since 2026-12-06, AVX-512 since 2026-12-07, with their
    # scalar tails) on random bit patterns (NaN payloads, infinities, subnormals, -0.0),
    # contiguous and strided, against nan_to_num_ + mul_ (maybe_scale_: mul_) bit for bit,
    # overflow to inf and a negative scale's -0.0 included.
    fn = getattr(reference if path == "reference" else torch.ops.gradguard, op)
    zero = op == "zero_nonfinite_and_scale_"
    g = torch.Generator().manual_seed(32)
    iv = torch.int32 if dtype == torch.float32 else torch.int64
    bits = torch.randint(-(1 << 62), 1 << 62, (200_003,), generator=g, dtype=torch.int64)
    bits = (bits.to(torch.int32) if iv == torch.int32 else bits * 2 + 1)
    for scale in (0.25, 1 / 3, 3.0, -2.5, 1e30):
        x = bits.clone().view(dtype)
        strided = bits.clone().view(dtype)
        want = (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if zero else x.clone()).mul_(
            torch.tensor(scale, dtype=torch.float64).to(torch.float32 if dtype == torch.float32 else dtype))
        fn([x, strided[::3]], torch.tensor(scale) if dtype == torch.float32 else torch.tensor(scale, dtype=dtype))
        assert _same_numbers(x, want), (dtype, scale)
        assert _same_numbers(strided[::3], want[::3]), (dtype, scale)
        assert torch.equal(strided[1::3].view(iv), bits[1::3]), "elements outside the view were written"


@pytest.mark.parametrize("path", [name for name, _ in stats_paths()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_kernels_every_16bit_pattern(path, dtype):
    # Every bit pattern (NaN payloads, infinities, subnormals, -0.0) in a contiguous tensor (the
    # AVX-512 loops of scale_zmm.h or the AVX2 ones of simd_avx2.h, and their tails) and a strided view (the scalar loop), against
    # torch: zero_nonfinite_and_scale_ as nan_to_num_ + mul_, maybe_scale_ as mul_, bit for bit:
    # the product formed in float32 and rounded once, scales that round, overflow to inf and
    # underflow to 0, a negative scale's -0.0 for zeroed elements, zero, infinite and NaN scales.
    ops = {"reference": (reference.zero_nonfinite_and_scale_, reference.maybe_scale_),
           "dispatcher": (torch.ops.gradguard.zero_nonfinite_and_scale_, torch.ops.gradguard.maybe_scale_)}[path]
    g = torch.Generator().manual_seed(16)
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    bits = torch.cat([bits[torch.randperm(bits.numel(), generator=g)], bits[:13]])
    for zero, fn in zip((True, False), ops):
        # The last scale is a NaN with every payload bit set: the bfloat16 loop for scales that
        # are not NaN rounds without a NaN fix-up, which such a payload would carry into -0.0.
        scales = [torch.tensor(v) for v in (0.25, 1 / 3, 3.0, 1e-6, -2.5, 0.0, -0.0, INF, -INF, NAN, 3e38)]
        for scale in scales + [torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)]:
            x = bits.clone().view(dtype)
            strided = bits.clone().view(dtype)
            want = x.clone()
            if zero:
                want.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            want.mul_(scale)
            fn([x, strided[::3]], scale)
            assert _same_numbers(x, want), (zero, dtype, scale)
            assert _same_numbers(strided[::3], want[::3]), (zero, dtype, scale)
            assert torch.equal(strided[1::3].view(torch.int16), bits[1::3]), "elements outside the view were written"


SCALE_REFUSALS = [
    # (tensors, scale, error, message, also refused by the fake kernel)
    (lambda: [torch.ones(3, requires_grad=True) * 2], torch.tensor(0.5), RuntimeError, r"tensors\[0\] requires grad",
     False),
    (lambda: [torch.ones(3, requires_grad=True)], torch.tensor(1.0), RuntimeError, r"tensors\[0\] requires grad", False),
    (lambda: [torch.ones(2)], torch.tensor([0.5, 1.0]), RuntimeError, r"`scale` must hold one element, got shape \[2\]",
     True),
    (lambda: [], torch.tensor([0.5, 1.0]), RuntimeError, r"`scale` must hold one element", True),
    (lambda: [torch.ones(2), torch.ones(2, dtype=torch.float64)], torch.tensor(0.5), RuntimeError,
     r"tensors\[1\] has dtype (Double|torch.float64) but tensors\[0\] has", True),
    (lambda: [torch.ones(2)], torch.tensor(2j), TypeError, r"`scale` must be real", True),
    (lambda: [torch.ones(2, dtype=torch.complex64)], torch.tensor(0.5), NotImplementedError,
     r"dtype (ComplexFloat|torch.complex64) is not supported; the op takes float16", True),
    (lambda: [torch.ones(2, dtype=torch.int32)], torch.tensor(0.5), NotImplementedError,
     r"dtype (Int|torch.int32) is not supported", True),
    (lambda: [torch.zeros(2, dtype=torch.float8_e4m3fn)], torch.tensor(0.5), NotImplementedError,
     r"dtype (Float8_e4m3fn|torch.float8_e4m3fn) is not supported", True),
]


@pytest.mark.parametrize("path", ["reference", "dispatcher", "fake"])
@pytest.mark.parametrize("op", ["maybe_scale_", "zero_nonfinite_and_scale_"])
@pytest.mark.parametrize("case", range(len(SCALE_REFUSALS)))
def test_scale_kernels_refuse_the_same_arguments_on_every_kernel(path, op, case):
    # The reference kernels took what the compiled ones refuse: a tensor that requires grad (scaled
    # through autograd), a scale of several elements (element by element), a mixed-dtype list and
    # complex tensors; and the compiled CPU kernel took a complex scale (its real part, with a
    # warning: a gradient times 2j came back zeroed).
    make, scale, error, msg, fake_too = SCALE_REFUSALS[case]
    tensors = make()
    if path == "fake":
        if not fake_too:
            pytest.skip("autograd is checked by the real kernels only")
        tensors = [t.detach().to("meta") for t in tensors]
        scale = scale.to("meta")
    before = [t.detach().clone() for t in tensors]
    fn = getattr(reference if path == "reference" else torch.ops.gradguard, op)
    with pytest.raises(error, match=msg):
        fn(tensors, scale)
    if path != "fake":
        assert all(torch.equal(t.detach(), b) for t, b in zip(tensors, before))  # nothing written


def test_stats_op_refuses_float8_and_a_norm_type_of_0_alike_on_every_kernel():
    for fn in (reference.multi_tensor_stats, torch.ops.gradguard.multi_tensor_stats):
        with pytest.raises(NotImplementedError, match=r"dtype (Float8_e4m3fn|torch.float8_e4m3fn) is not supported"):
            fn([torch.zeros(2, dtype=torch.float8_e4m3fn)], 2.0)
        with pytest.raises(ValueError, match=r"`norm_type` must be > 0"):
            fn([torch.zeros(2)], 0.0)


@needs_ext
@pytest.mark.parametrize("op", ["maybe_scale_", "zero_nonfinite_and_scale_"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scale_kernels_refuse_a_tensor_that_requires_grad_outside_no_grad(op, dtype):
    # float16/bfloat16 maybe_scale_ (its own loop since 2026-12-06) and zero_nonfinite_and_scale_
    # wrote into a leaf that requires grad, unrecorded; torch's in-place ops (and the reference)
    # refuse it. Under no_grad, as every gradguard caller runs them, it is scaled.
    fn = getattr(torch.ops.gradguard, op)
    x = torch.ones(40, dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        fn([x], torch.tensor(0.5))
    assert torch.equal(x.detach(), torch.ones(40, dtype=dtype))
    with torch.no_grad():
        fn([x], torch.tensor(0.5))
    assert torch.equal(x.detach(), torch.full((40,), 0.5, dtype=dtype))


@pytest.mark.parametrize("op", ["maybe_scale_", "zero_nonfinite_and_scale_"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_kernels_scale_a_tensor_listed_twice_twice(op, dtype):
    # The same tensor twice (and a view into it) is scaled once per listing, in order, as
    # torch._foreach_mul_ does: on two threads the work items raced over the same elements.
    fn = getattr(torch.ops.gradguard, op)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(5):
            x = torch.full((9 * CHUNK,), 3.0, dtype=dtype)
            other = [torch.full((CHUNK,), 3.0, dtype=dtype) for _ in range(6)]
            fn([x, *other, x, x[CHUNK:2 * CHUNK]], torch.tensor(0.5))
            want = torch.full((9 * CHUNK,), 0.75, dtype=dtype)
            want[CHUNK:2 * CHUNK] = 0.375
            assert torch.equal(x, want)
            assert all(torch.equal(t, torch.full((CHUNK,), 1.5, dtype=dtype)) for t in other)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
def test_a_one_element_scale_of_any_shape_is_taken_by_every_kernel(op, kernel, dtype):
    # The checks take one element of any shape; torch's _foreach_mul_ under the float32/float64
    # kernels and the reference wanted a 0-dim one.
    fn = getattr(torch.ops.gradguard if kernel == "dispatcher" else reference, op)
    t = torch.ones(3, dtype=dtype)
    fn([t], torch.tensor([[2.0]]))
    assert torch.equal(t, torch.full((3,), 2.0, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
def test_a_float64_scale_is_rounded_alike_for_0_dim_tensors(op, kernel, dtype):
    # Two 0-dim operands promote: a 0-dim float32 gradient times a float64 scale was computed in
    # float64 and rounded once (1 ulp from the kernels' product by the float32-rounded scale,
    # which every other tensor got): clip_grad_norm_(nonfinite="zero") on a learned temperature.
    fn = getattr(torch.ops.gradguard if kernel == "dispatcher" else reference, op)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, generator=g, dtype=torch.float64).add_(0.5).to(dtype)
    scale = torch.tensor(1 / 7, dtype=torch.float64)
    op_math = torch.float64 if dtype == torch.float64 else torch.float32
    want = (x.to(op_math) * scale.to(op_math)).to(dtype)
    zero_dim = [v.clone() for v in x]
    fn(zero_dim, scale)
    assert torch.equal(torch.stack(zero_dim), want)
    flat = x.clone()
    fn([flat], scale)
    assert torch.equal(flat, want)


@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
def test_scaling_ops_refuse_overlapping_views_before_writing_anything(op, kernel):
    # A view whose elements alias each other would be scaled twice. The reference refused it only
    # when it reached that tensor, the tensors before it already scaled.
    fn = getattr(torch.ops.gradguard if kernel == "dispatcher" else reference, op)
    first = torch.arange(6.0)[::2]  # non-contiguous: the strided path
    second = torch.ones(1).expand(4)
    with pytest.raises(RuntimeError, match="more than one element"):
        fn([first, second], torch.tensor(2.0))
    assert torch.equal(first, torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(second, torch.ones(4))


shape_st = st.lists(st.integers(0, 40), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(shape_st, min_size=1, max_size=5),
    dtype_idx=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    specials=st.lists(st.sampled_from([NAN, INF, -INF, 1e30, -0.0, 5e-39]), max_size=4),
    p=st.sampled_from(NORM_TYPES),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
def test_hypothesis_random_lists_match_math(shapes, dtype_idx, specials, p, seed, transpose):
    g = torch.Generator().manual_seed(seed)
    ts = []
    for k, shape in enumerate(shapes):
        dtype = FLOAT_DTYPES[dtype_idx[k]]
        t = torch.randn(shape, generator=g).to(dtype)
        if t.numel():
            for j, v in enumerate(specials):
                t.view(-1)[(seed + 7 * j) % t.numel()] = v
        if transpose and t.dim() >= 2:
            t = t.transpose(0, -1)
        ts.append(t)
    s = gradguard.grad_stats(ts, p)
    assert_matches_math(s, ts, p, rtol=1e-5 if p not in (1.0, 2.0, INF) else 1e-6)


_ISA_CHECK = """
import math, torch, gradguard
from gradguard import reference
from test_grad_stats import layouts, NORM_TYPES
assert gradguard.backend()["cpu"] == "extension"
for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    ts = list(layouts(dtype).values()) + [torch.tensor([1e20, math.nan, -math.inf, 2.0]).to(dtype),
                                          torch.full((3000,), 1e-30).to(dtype)]
    for p in NORM_TYPES:
        got = torch.ops.gradguard.multi_tensor_stats(ts, p)
        want = reference.multi_tensor_stats([t.contiguous() for t in ts], p)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
from test_grad_stats import (test_16bit_squares_are_exact_in_every_binade, test_16bit_zeros_and_subnormals_are_exact,
                             test_scale_kernels_every_16bit_pattern, test_scaling_random_bit_patterns,
                             test_a_float64_scale_beyond_float32_multiplies_by_its_float32_rounding,
                             test_a_scale_that_is_an_element_of_a_tensor_counts_with_the_value_it_had)
for dtype in (torch.float16, torch.bfloat16):
    test_16bit_squares_are_exact_in_every_binade("dispatcher", dtype)
    test_16bit_zeros_and_subnormals_are_exact("dispatcher", dtype)
    test_scale_kernels_every_16bit_pattern("dispatcher", dtype)
for op in ("zero_nonfinite_and_scale_", "maybe_scale_"):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        test_a_float64_scale_beyond_float32_multiplies_by_its_float32_rounding("dispatcher", dtype, op)
for dtype in (torch.float32, torch.float64):
    for op in ("zero_nonfinite_and_scale_", "maybe_scale_"):
        test_scaling_random_bit_patterns("dispatcher", dtype, op)
        test_a_scale_that_is_an_element_of_a_tensor_counts_with_the_value_it_had("dispatcher", op, dtype, "cpu")
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_stats_kernel_copies_of_other_isas(isa):
    # This CPU runs its widest copy; each copy (portable, AVX2, AVX-512 where the CPU has it: else
    # the widest below it) runs here in a subprocess: the stats kernel's, and the 16-bit scaling
    # loops'.
    run_under_isa(_ISA_CHECK, isa)


def test_a_string_norm_type_says_to_pass_a_number():
    # The message said "must be a positive number or inf, got 'inf'", which reads as a contradiction.
    with pytest.raises(ValueError, match=r"got the string 'inf': pass a number, e\.g\. float\('inf'\)"):
        gradguard.GradGuard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), norm_type="inf")
    # ... but only where that conversion works (it suggested float('two')).
    with pytest.raises(ValueError, match=r"got the string 'two' \(only the clip functions"):
        gradguard.GradGuard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), norm_type="two")


def test_meta_tensors_are_refused_by_name():
    # Before: "Cannot copy out of meta tensor; no data!" from deep inside, naming nothing.
    with pytest.raises(ValueError, match=r"tensors\[1\] is on the meta device"):
        gradguard.grad_stats([torch.ones(3), torch.ones(3, device="meta")])
    for fn in (gradguard.all_finite, gradguard.grad_stats):  # the same on both backends
        with pytest.raises(ValueError, match=r"tensors\[0\] is on the meta device"):
            fn([torch.ones(3, device="meta")])


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensors_are_refused_by_name(layout):
    # A nested tensor's layout reads strided: it passed the plain-list checks and reached the
    # dispatcher, whose error named the NestedTensorCPU backend and no argument.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are in prototype stage"
        nt = torch.nested.nested_tensor([torch.ones(3), torch.ones(2)], layout=layout)
    for fn in (gradguard.all_finite, gradguard.grad_stats):
        with pytest.raises(TypeError, match=r"tensors\[1\] is a nested tensor"):
            fn([torch.ones(3), nt])
        with pytest.raises(TypeError, match=r"tensors\[0\] is a nested tensor"):
            fn([nt])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
def test_a_scale_that_is_an_element_of_a_tensor_counts_with_the_value_it_had(kernel, op, dtype, device):
    # The scale is read once, before anything is written. Before: the AVX-512 loops did so, torch's
    # _foreach_mul_ (the AVX2 copy's float32 maybe_scale_, and the reference) refused the alias,
    # and the reference's zeroing loop re-read it per tensor (bfloat16: 12.0 for the second). On
    # CUDA every block read it from memory, after the block owning a[0] might have written 4.0
    # there: b's 8 chunks (64K elements each) came out 6 or 12 at random.
    fn = getattr(torch.ops.gradguard if kernel == "dispatcher" else reference, op)
    a, b = torch.full((100,), 2.0, dtype=dtype, device=device), torch.full((1 << 19,), 3.0, dtype=dtype, device=device)
    fn([a, b], a[0])
    assert (a[0].item(), a[1].item()) == (4.0, 4.0) and bool((b == 6.0).all())


@pytest.mark.parametrize("op", ["zero_nonfinite_and_scale_", "maybe_scale_"])
@pytest.mark.parametrize("kernel", ["dispatcher", "reference"])
@pytest.mark.parametrize("scale_on", ["cpu", "device"])
def test_an_integer_scale_beyond_2_53_is_rounded_once(kernel, op, scale_on, device):
    # Read as a double and then rounded to float32, 2^60 + 2^36 + 1 came out 1 ulp from torch's
    # single rounding (int64 -> float32); the CUDA kernel did so with a CPU scale until it took
    # the CPU kernel's rounding (kernel_dtypes.h, op_math_scale).
    fn = getattr(torch.ops.gradguard if kernel == "dispatcher" else reference, op)
    scale = torch.tensor(2**60 + 2**36 + 1, device=device if scale_on == "device" else "cpu")
    x = torch.ones(40, device=device)
    fn([x], scale)
    assert torch.equal(x.cpu(), torch.ones(40) * scale.cpu().to(torch.float32))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _simd_tail_acc(values: list[float]) -> float:
    """The AVX2/AVX-512 copies' sum of squares of fewer than 32 float32 values (stats_ymm.h,
    simd::sums's tail): 8 values a step, the last step zero-padded, lanes 0-3 into one 4-lane
    chain and 4-7 into another (an FMA each: a float32 square is exact in float64, so FMA and
    square-then-add round alike), the chains added lane by lane, then (0 + 1) + (2 + 3); divided
    by amax^2 as the op's `acc` is."""
    lo, hi = [0.0] * 4, [0.0] * 4
    for b in range(0, len(values), 8):
        block = values[b:b + 8] + [0.0] * (8 - len(values[b:b + 8]))
        for k in range(4):
            lo[k] = lo[k] + block[k] * block[k]
            hi[k] = hi[k] + block[4 + k] * block[4 + k]
    t = [lo[k] + hi[k] for k in range(4)]
    total = (t[0] + t[1]) + (t[2] + t[3])
    amax = max(abs(v) for v in values)
    return total / (amax * amax) if amax > 0 else 0.0


@needs_ext
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags() or os.environ.get("GRADGUARD_CPU_ISA") == "default",
                    reason="the order pinned here is that of the AVX2 and AVX-512 copies")
def test_small_float32_sums_keep_the_simd_tail_order_bit_for_bit():
    # Tensors of 1-31 float32 elements are all tail in the SIMD copies; the one-thread kernel
    # calls that tail directly for them (grad_stats_cpu.cpp) and it loads the last few lanes
    # masked (stats_ymm.h). The bits must stay those of the order above, for every length.
    g = torch.Generator().manual_seed(3)
    for n in range(1, 32):
        for scale in (1e-30, 1.0, 1e30):
            t = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(torch.float32)
            if n > 2:
                t[1] = 0.0
            acc, nan, inf, amax = torch.ops.gradguard.multi_tensor_stats([t], 2.0)
            want = _simd_tail_acc(t.tolist())
            assert acc.item() == want, (n, scale, acc.item(), want)  # exact: no tolerance
            assert amax.item() == max(abs(v) for v in t.tolist()) and nan.item() == inf.item() == 0
    zeros = torch.zeros(5)
    assert torch.ops.gradguard.multi_tensor_stats([zeros], 2.0)[0].item() == 0.0


@pytest.mark.parametrize("case", ["empty", "norm_type-0", "norm_type-nan", "mixed-dtypes"])
def test_the_fake_kernel_refuses_what_the_real_ones_refuse(case):
    # The fake kernel (what torch.compile and export trace) took a norm_type <= 0 and a mixed
    # list, which fail at run time, and raised a RuntimeError for an empty list (a ValueError).
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    real = {"empty": ([], 2.0), "norm_type-0": ([torch.ones(3)], 0.0), "norm_type-nan": ([torch.ones(3)], math.nan),
            "mixed-dtypes": ([torch.ones(3), torch.ones(3, dtype=torch.float64)], 2.0)}[case]
    err, msg = ((ValueError, "must not be empty") if case == "empty" else (ValueError, "`norm_type` must be > 0")
                if case.startswith("norm_type") else (RuntimeError, r"tensors\[1\] has dtype (torch.float64|Double)"))
    op = torch.ops.gradguard.multi_tensor_stats.default
    with pytest.raises(err, match=msg):
        op(*real)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real[0]]
        with pytest.raises(err, match=msg):
            op(fake, real[1])

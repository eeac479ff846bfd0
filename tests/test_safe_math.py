"""Safe math: values and gradients against the eager composites (bit for bit) and float64 math,
boundaries and special values, every dtype and layout, both kernel paths, out=, errors, opcheck,
torch.compile and gradcheck.

"Both paths": each op is called through the public API (the dispatcher: the C++ kernel when
the extension is loaded, the reference otherwise) and the reference kernels are called
directly; both must equal the composite.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import EXT_LOADED, FLOAT_DTYPES, needs_ext, run_under_isa

import gradguard
from gradguard import reference
from gradguard.safe_math import EXP_MAX

ops = torch.ops.gradguard
TINY = {dt: torch.finfo(dt).tiny for dt in FLOAT_DTYPES}
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(got: torch.Tensor, want: torch.Tensor):
    """Equal dtype and shape, NaN at the same places, every other element bit-identical (so
    -0.0 != 0.0)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    iv = INT_VIEW[got.element_size()]
    g = got.contiguous().view(iv)[~nan]
    w = want.contiguous().view(iv)[~nan]
    if not torch.equal(g, w):
        bad = (g != w).nonzero()[:5].flatten()
        raise AssertionError(f"{(g != w).sum().item()} of {g.numel()} elements differ; first: "
                             f"got {got[~nan][bad].tolist()} want {want[~nan][bad].tolist()}")


def sample(dtype, n=3000, scale=30.0, seed=0, specials=True):
    """Random values of both signs and wide magnitude, plus zeros, -0.0, +-inf, NaN, tiny,
    denormals, and values at the default bounds."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    if specials:
        fi = torch.finfo(dtype)
        sub = fi.tiny * 2 ** -3 if dtype != torch.bfloat16 else fi.tiny / 8
        vals = [0.0, -0.0, math.inf, -math.inf, math.nan, fi.tiny, -fi.tiny, sub, fi.smallest_normal / 2,
                EXP_MAX[dtype], -EXP_MAX[dtype], 1e-3, 0.5, 3.0, fi.max, -fi.max]
        v = torch.tensor(vals, dtype=torch.float64).to(dtype)
        x[: v.numel()] = v
        x[v.numel()::97] = 0.0
    return x


# ---- composites: the definition of the semantics --------------------------------------------------

# torch.clamp's gradient at exactly the bound changed in torch 2.14 (it passed the gradient up
# to 2.13; 2.14 gives 0 there). gradguard keeps one semantic on every torch: the gradient passes
# at x == eps (log) and x == max (exp), and not at NaN. Below, clamp's values (bit for bit, NaN
# included) with the gradient passing exactly where x >= eps (x <= max): torch <= 2.13's clamp on
# every torch version, so it is the composite the tests compare to.
def comp_log(x, eps):
    return torch.log(torch.where(x >= eps, x, torch.clamp(x, min=eps).detach()))


def comp_exp(x, m):
    return torch.exp(torch.where(x <= m, x, torch.clamp(x, max=m).detach()))


def comp_sqrt(x):
    return torch.sqrt(torch.clamp(x, min=0.0))


def composite_grad(fn, x, g, *args):
    x = x.detach().requires_grad_(True)
    fn(x, *args).backward(g)
    return x.grad


def api_grad(fn, x, g, **kw):
    x = x.detach().requires_grad_(True)
    y = fn(x, **kw)
    y.backward(g)
    return y.detach(), x.grad


# ---- values and gradients vs the composites --------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-3, 0.5, 0.0])
def test_log_matches_composite(dtype, eps):
    x = sample(dtype)
    e = TINY[dtype] if eps is None else eps
    want = comp_log(x, e)
    assert_same_bits(gradguard.safe_log(x, eps), want)
    assert_same_bits(reference.safe_log(x, e, False), want)
    g = sample(dtype, seed=1, specials=False)
    y, gx = api_grad(gradguard.safe_log, x, g, eps=eps)
    assert_same_bits(gx, composite_grad(comp_log, x, g, e))
    assert_same_bits(reference.safe_log_backward(g, x, e, False), gx)
    # straight-through: grad / max(x, eps) everywhere
    _, gst = api_grad(gradguard.safe_log, x, g, eps=eps, grad="straight_through")
    assert_same_bits(gst, g / torch.clamp(x, min=e))
    assert_same_bits(reference.safe_log_backward(g, x, e, True), gst)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [None, 3.0, -1.5])
def test_exp_matches_composite(dtype, m):
    x = sample(dtype, scale=10.0)
    mm = EXP_MAX[dtype] if m is None else m
    want = comp_exp(x, mm)
    assert_same_bits(gradguard.safe_exp(x, m), want)
    assert_same_bits(reference.safe_exp(x, mm, False), want)
    g = sample(dtype, seed=1, specials=False)
    y, gx = api_grad(gradguard.safe_exp, x, g, max=m)
    assert_same_bits(gx, composite_grad(comp_exp, x, g, mm))
    assert_same_bits(reference.safe_exp_backward(g, want, x, mm, False), gx)
    _, gst = api_grad(gradguard.safe_exp, x, g, max=m, grad="straight_through")
    assert_same_bits(gst, g * want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_sqrt_matches_composite_with_finite_gradient(dtype, eps):
    x = sample(dtype, scale=5.0)
    want = comp_sqrt(x)
    assert_same_bits(gradguard.safe_sqrt(x, eps), want)
    assert_same_bits(reference.safe_sqrt(x, eps), want)
    g = sample(dtype, seed=1, specials=False)
    _, gx = api_grad(gradguard.safe_sqrt, x, g, eps=eps)
    e = torch.tensor(eps, dtype=torch.float64).to(dtype)
    above = x > e
    assert_same_bits(gx[above], composite_grad(lambda t: comp_sqrt(t), x, g)[above])
    assert torch.all(gx[~above] == 0), "zero gradient at and below eps (and at NaN)"
    assert torch.isfinite(gx[torch.isfinite(x)]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps,fill", [(None, 0.0), (1e-2, -7.0), (0.5, math.nan)])
def test_div_matches_torch_div_outside_the_guard(dtype, eps, fill):
    a = sample(dtype, seed=2)
    b = sample(dtype, seed=3, scale=2.0)
    b[::5] = 0.0
    b[1::10] = -0.0
    a[5] = math.nan          # NaN numerator over 0: stays NaN
    b[5] = 0.0
    e = 0.0 if eps is None else eps
    ec = torch.tensor(e, dtype=torch.float64).to(dtype)
    guard = b.abs() <= ec
    want = torch.where(guard & ~a.isnan(), torch.tensor(fill, dtype=dtype), a / b)
    got = gradguard.safe_div(a, b, eps=eps, fill=fill)
    assert_same_bits(got, want)
    assert_same_bits(reference.safe_div(a, b, e, fill), want)
    assert torch.isnan(got[5])
    g = sample(dtype, seed=4, specials=False)
    aa, bb = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    gradguard.safe_div(aa, bb, eps=eps, fill=fill).backward(g)
    ta, tb = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    (ta / tb).backward(g)
    assert_same_bits(aa.grad[~guard], ta.grad[~guard])
    assert_same_bits(bb.grad[~guard], tb.grad[~guard])
    assert torch.all(aa.grad[guard] == 0) and torch.all(bb.grad[guard] == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_close_to_float64_math(dtype):
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-7, torch.float64: 1e-15}[dtype]
    x = torch.rand(5000, dtype=torch.float64).mul(20).sub(5).to(dtype)
    x64 = x.double()
    for got, want in [
        (gradguard.safe_log(x, 0.25), torch.log(x64.clamp(min=0.25))),
        (gradguard.safe_exp(x, 4.0), torch.exp(x64.clamp(max=4.0))),
        (gradguard.safe_sqrt(x), torch.sqrt(x64.clamp(min=0.0))),
        (gradguard.safe_div(x, x.flip(0).abs() + 1), x64 / (x.flip(0).abs() + 1).double()),
    ]:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ---- boundaries and special values ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_boundaries_and_special_values(dtype):
    inf, nan = math.inf, math.nan
    t = lambda *v: torch.tensor(v, dtype=dtype)  # noqa: E731
    # log: exactly eps passes the gradient (clamp's >=), below gets 0; +inf -> +inf; NaN -> NaN
    x = t(0.5, 0.25, 0.0, -0.0, inf, nan, -inf).requires_grad_(True)
    y = gradguard.safe_log(x, 0.5)
    y.backward(torch.ones_like(y))
    assert y[0] == math.log(0.5) and y[1] == y[0] and y[2] == y[0] and y[3] == y[0] and y[6] == y[0]
    assert y[4] == inf and torch.isnan(y[5])
    assert x.grad.tolist()[:1] == [2.0] and x.grad.tolist()[1:] == [0.0] * 6
    # default eps: finite for every finite input, the denormals and zeros included
    z = gradguard.safe_log(t(0.0, -0.0, -1.0, TINY[dtype] / 4, -inf))
    assert torch.isfinite(z).all()
    assert torch.all(z == math.log(TINY[dtype]))  # log(tiny) is exact enough in every dtype to be one value
    # exp: exactly max passes the gradient, above gets 0; -inf -> 0; NaN -> NaN; default never inf
    x = t(3.0, 4.0, -inf, nan, inf).requires_grad_(True)
    y = gradguard.safe_exp(x, 3.0)
    y.backward(torch.ones_like(y))
    assert y[1] == y[0] and y[2] == 0 and torch.isnan(y[3]) and y[4] == y[0]
    assert x.grad[0] == y[0] and x.grad[1:].eq(0).all()
    assert torch.isfinite(gradguard.safe_exp(t(inf, 1e4, EXP_MAX[dtype]))).all()
    # sqrt: value of the composite, zero gradient at and below eps
    x = t(0.0, -0.0, -1.0, 4.0, 0.01, nan).requires_grad_(True)
    y = gradguard.safe_sqrt(x)
    y.backward(torch.ones_like(y))
    assert torch.signbit(y[1]) and y[0] == 0 and y[2] == 0 and torch.isnan(y[5])
    assert x.grad.tolist()[:3] == [0.0, 0.0, 0.0] and x.grad[3] == 0.25 and torch.isfinite(x.grad).all()
    # div: |other| <= eps is guarded, other values divide; NaN other propagates
    a, b = t(1.0, nan, 1.0, 1.0, 1.0, 0.0), t(0.0, 0.0, -0.0, 0.25, nan, 0.0)
    assert_same_bits(gradguard.safe_div(a, b, fill=9.0), t(9.0, nan, 9.0, 4.0, nan, 9.0))
    assert_same_bits(gradguard.safe_div(a, b, eps=0.25), t(0.0, nan, 0.0, 0.0, nan, 0.0))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_default_exp_max_is_the_largest_finite(dtype):
    m = torch.tensor(EXP_MAX[dtype], dtype=dtype)
    assert m.item() == EXP_MAX[dtype], "representable in the dtype"
    assert torch.isfinite(torch.exp(m))
    assert torch.isinf(torch.exp(torch.nextafter(m, torch.tensor(math.inf, dtype=dtype))))


# ---- layouts, broadcasting, out= ------------------------------------------------------------------

def layouts(dtype):
    base = sample(dtype, n=6 * 40 * 50, scale=4.0).reshape(6, 40, 50)
    return {
        "contiguous": base,
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::3, 1::2],
        "short_rows": base[..., :3],
        "expanded": base[:, :1, :].expand(6, 40, 50),
        "channels_last": base.reshape(3, 2, 40, 50).contiguous(memory_format=torch.channels_last),
        "0-d": base[1, 2, 3],
        "empty": base[:, :0],
        "large": sample(dtype, n=(1 << 18) + 33, scale=4.0),  # several blocks and both threads
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", list(layouts(torch.float32)))
def test_layouts(dtype, layout):
    x = layouts(dtype)[layout]
    g = torch.ones_like(x)
    for fn, comp, kw in [
        (gradguard.safe_log, lambda t: comp_log(t, 0.5), {"eps": 0.5}),
        (gradguard.safe_exp, lambda t: comp_exp(t, 2.0), {"max": 2.0}),
        (gradguard.safe_sqrt, comp_sqrt, {"eps": 0.0}),
    ]:
        y, gx = api_grad(fn, x, g, **kw)
        assert_same_bits(y, comp(x))
        want_g = composite_grad(comp, x, g)
        if fn is gradguard.safe_sqrt:
            want_g = torch.where(x > 0, want_g, 0.0)
        assert_same_bits(gx, want_g)
        # the result is laid out like the input, as the fake kernel says (torch.empty_like)
        assert y.stride() == torch.empty_like(x).stride()
        # an out= whose layout differs from the input's (its last two dims swapped in memory)
        out = torch.empty_like(x.mT).mT if x.dim() >= 2 else torch.empty_like(x)
        assert_same_bits(fn(x, **kw, out=out), comp(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shapes", [((3, 1, 5), (4, 1)), ((7,), ()), ((), (2, 3)), ((4, 5), (4, 5))])
def test_div_broadcasting(dtype, shapes):
    sa, sb = shapes
    # Seeded, and divisors kept away from 0 but the guarded ones: a float16 divisor near 0
    # overflowed a summed divisor gradient to inf - inf = NaN now and then (a flaky failure).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(sa, dtype=torch.float64, generator=gen).to(dtype)
    b = torch.randn(sb, dtype=torch.float64, generator=gen)
    b = (b.sign() * (b.abs() + 0.25)).to(dtype)
    if b.numel() > 1:
        b.view(-1)[::2] = 0.0
    aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = gradguard.safe_div(aa, bb, fill=1.5)
    guard = torch.broadcast_to(b == 0, y.shape)
    want = torch.where(guard, torch.tensor(1.5, dtype=dtype), a / b)
    assert_same_bits(y.detach(), want)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen).to(dtype)
    y.backward(g)
    assert aa.grad.shape == a.shape and bb.grad.shape == b.shape
    # torch.div's gradients with the guarded elements' contributions zeroed, summed by autograd
    ta, tb = a.clone().requires_grad_(True), b.where(b != 0, torch.ones_like(b)).requires_grad_(True)
    (ta / tb).backward(g.masked_fill(guard, 0))
    torch.testing.assert_close(aa.grad, ta.grad, rtol=0, atol=0)
    torch.testing.assert_close(bb.grad.masked_fill(b == 0, 0), tb.grad.masked_fill(b == 0, 0), rtol=0, atol=0)
    assert torch.all(bb.grad[b == 0] == 0)


def test_div_promotes_like_torch_div():
    dts = [torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for da in dts:
        for db in dts:
            for shape_a, shape_b in [((3,), (3,)), ((3,), ()), ((), (3,)), ((), ())]:
                a, b = torch.ones(shape_a, dtype=da), torch.ones(shape_b, dtype=db)
                assert gradguard.safe_div(a, b).dtype == torch.div(a, b).dtype, (da, db, shape_a, shape_b)
        for number in (2, 2.5):
            a = torch.ones(3, dtype=da)
            assert gradguard.safe_div(a, number).dtype == torch.div(a, number).dtype, (da, number)


def test_div_scalar_other_and_promotion():
    a = torch.arange(6, dtype=torch.int64)
    r = gradguard.safe_div(a, 0)
    assert r.dtype == torch.get_default_dtype() and torch.all(r == 0)
    assert_same_bits(gradguard.safe_div(a, 2), a / 2)
    h = torch.randn(5, dtype=torch.float16)
    assert gradguard.safe_div(h, torch.tensor(2.0)).dtype == torch.float16   # 0-dim does not promote
    assert gradguard.safe_div(h, torch.ones(5)).dtype == torch.float32
    assert_same_bits(gradguard.safe_div(h, 2.0), h / 2.0)


@pytest.mark.parametrize("fn", [gradguard.safe_log, gradguard.safe_exp, gradguard.safe_sqrt])
def test_integer_inputs_promote_like_torch_log(fn):
    for dt in (torch.int32, torch.int64, torch.uint8, torch.bool):
        x = torch.tensor([0, 1, 2, 5]).to(dt)
        y = fn(x)
        assert y.dtype == torch.log(x).dtype == torch.get_default_dtype()
        assert_same_bits(y, fn(x.to(y.dtype)))


def test_out_preallocated_resized_and_refused_with_grad():
    x = torch.rand(10, 20) + 0.1
    out = torch.empty(10, 20)
    r = gradguard.safe_log(x, out=out)
    assert r is out or r.data_ptr() == out.data_ptr()
    assert_same_bits(out, comp_log(x, TINY[torch.float32]))
    for fn in (gradguard.safe_exp, gradguard.safe_sqrt):
        o = torch.empty(10, 20)
        fn(x, out=o)
        assert_same_bits(o, fn(x))
    o = torch.empty(10, 20)
    gradguard.safe_div(x, x.t().contiguous().t(), out=o)
    assert_same_bits(o, gradguard.safe_div(x, x))
    o = torch.empty(0)
    gradguard.safe_log(x, out=o)  # resized silently from empty
    assert o.shape == x.shape
    o = torch.empty(3)
    with pytest.warns(UserWarning, match="resized"):
        gradguard.safe_exp(x, out=o)
    assert o.shape == x.shape
    with pytest.raises(RuntimeError, match="out"):
        gradguard.safe_log(x, out=torch.empty(10, 20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        gradguard.safe_log(x.requires_grad_(True), out=torch.empty(10, 20))
    with torch.no_grad():
        gradguard.safe_log(x, out=out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [40, 70000])  # the staged path and the direct (long-row) path
def test_out_in_place(dtype, n):
    x = sample(dtype, n=n, scale=100.0)
    for fn, comp in [(lambda t, **kw: gradguard.safe_log(t, 0.5, **kw), lambda t: comp_log(t, 0.5)),
                     (lambda t, **kw: gradguard.safe_exp(t, 3.0, **kw), lambda t: comp_exp(t, 3.0)),
                     (gradguard.safe_sqrt, comp_sqrt),
                     (lambda t, **kw: gradguard.safe_div(t, t.flip(0), eps=0.5, **kw),
                      lambda t: reference.safe_div(t, t.flip(0), 0.5, 0.0))]:
        o = x.clone()
        fn(o, out=o)
        assert_same_bits(o, comp(x))


def every_16bit_value(dtype, repeat=1):
    """All 65536 bit patterns of a 16-bit dtype (NaN payloads, -0.0, infinities, subnormals),
    shuffled so that the values beyond any bound are scattered (as in a real tensor), then
    `repeat` copies and 7 more elements: a row of the direct path, its 16-wide loops and their
    tails."""
    g = torch.Generator().manual_seed(16)
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    bits = bits[torch.randperm(bits.numel(), generator=g)].repeat(repeat)
    return torch.cat([bits, bits[:7]]).view(dtype)


def random_float32_bits(n=1 << 17):
    g = torch.Generator().manual_seed(32)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x[::5] = torch.rand(x[::5].shape, generator=g) * 4 - 1  # around the bounds too
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_bit_pattern_matches_composite(dtype):
    # The forward's passes around torch's math (stand-ins beyond the bound, math(bound) written
    # over them; AVX2 loops of their own for float16/bfloat16), on the direct path (one row of
    # several 256 KB blocks: the first runs torch's math on the input, the later ones, after a
    # block with many elements beyond the bound, on stand-ins), the staged path (in place) and a
    # view with short rows: every 16-bit pattern, random float32 patterns (float64 from them),
    # bit for bit against the composites.
    x = every_16bit_value(dtype, repeat=5) if dtype.itemsize == 2 else random_float32_bits().to(dtype)
    for fn, comp in [(lambda t, **kw: gradguard.safe_log(t, **kw), lambda t: comp_log(t, TINY[dtype])),
                     (lambda t, **kw: gradguard.safe_log(t, 0.0, **kw), lambda t: comp_log(t, 0.0)),
                     (lambda t, **kw: gradguard.safe_log(t, 1e-3, **kw), lambda t: comp_log(t, 1e-3)),
                     (gradguard.safe_sqrt, comp_sqrt),
                     (lambda t, **kw: gradguard.safe_exp(t, **kw), lambda t: comp_exp(t, EXP_MAX[dtype])),
                     (lambda t, **kw: gradguard.safe_exp(t, -1.5, **kw), lambda t: comp_exp(t, -1.5))]:
        want = comp(x)
        assert_same_bits(fn(x), want)
        o = x.clone()
        fn(o, out=o)
        assert_same_bits(o, want)
        rows = x[: 60 * 1000].view(60, 1000)[:, 3:]  # rows shorter than the direct path's minimum
        assert_same_bits(fn(rows), comp(rows))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_few_beyond_the_bound_per_block_matches_composite(dtype):
    # The direct path's other branch: a few elements beyond the bound in a block (zeros among
    # probabilities) run torch's math on the input itself, then get math(bound) written over.
    g = torch.Generator().manual_seed(5)
    x = torch.rand(200_003, generator=g, dtype=torch.float64).to(dtype)
    fi = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, -1.0, -math.inf, math.nan, fi.tiny, fi.tiny / 4, 2.0, math.inf, 1e-3],
                            dtype=torch.float64).to(dtype)
    x[::997] = specials.repeat(x[::997].numel() // specials.numel() + 1)[: x[::997].numel()]
    for fn, comp in [(lambda t: gradguard.safe_log(t), lambda t: comp_log(t, TINY[dtype])),
                     (lambda t: gradguard.safe_log(t, 0.0), lambda t: comp_log(t, 0.0)),
                     (lambda t: gradguard.safe_log(t, 1e-3), lambda t: comp_log(t, 1e-3)),
                     (gradguard.safe_sqrt, comp_sqrt),
                     (lambda t: gradguard.safe_exp(t, 0.999), lambda t: comp_exp(t, 0.999))]:
        assert_same_bits(fn(x), comp(x))


# ---- arguments and errors --------------------------------------------------------------------------

def test_bounds_as_0dim_tensors_equal_numbers():
    x = sample(torch.float32)
    assert_same_bits(gradguard.safe_log(x, torch.tensor(1e-3)), gradguard.safe_log(x, 1e-3))
    assert_same_bits(gradguard.safe_exp(x, torch.tensor(2.5, dtype=torch.float64)), gradguard.safe_exp(x, 2.5))
    assert_same_bits(gradguard.safe_sqrt(x, torch.tensor(0.1)), gradguard.safe_sqrt(x, 0.1))
    y = x.flip(0)
    assert_same_bits(gradguard.safe_div(x, y, eps=torch.tensor(0.5), fill=torch.tensor(2.0)),
                     gradguard.safe_div(x, y, eps=0.5, fill=2.0))
    assert_same_bits(gradguard.safe_log(x, 1), gradguard.safe_log(x, 1.0))  # ints are fine


@pytest.mark.parametrize("call,arg", [
    (lambda x: gradguard.safe_log(x, -1e-3), "eps"),
    (lambda x: gradguard.safe_log(x, math.nan), "eps"),
    (lambda x: gradguard.safe_log(x, torch.tensor([1e-3, 1e-3])), "eps"),
    (lambda x: gradguard.safe_log(x, grad="ste"), "grad"),
    (lambda x: gradguard.safe_exp(x, math.nan), "max"),
    (lambda x: gradguard.safe_exp(x, torch.tensor(math.nan)), "max"),
    (lambda x: gradguard.safe_exp(x, grad=None), "grad"),
    (lambda x: gradguard.safe_sqrt(x, -1.0), "eps"),
    (lambda x: gradguard.safe_div(x, x, eps=-1.0), "eps"),
    (lambda x: gradguard.safe_div(x, x, eps=math.nan), "eps"),
])
def test_invalid_arguments_raise_value_error_naming_them(call, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call(torch.ones(3))


@pytest.mark.parametrize("call,arg", [
    (lambda x: gradguard.safe_log(x, "small"), "eps"),
    (lambda x: gradguard.safe_log(x, True), "eps"),
    (lambda x: gradguard.safe_log(x, torch.tensor(True)), "eps"),
    (lambda x: gradguard.safe_exp(x, 1j), "max"),
    (lambda x: gradguard.safe_exp(x, torch.tensor(1j)), "max"),
    (lambda x: gradguard.safe_sqrt(x, [0.1]), "eps"),
    (lambda x: gradguard.safe_div(x, x, fill="zero"), "fill"),
])
def test_arguments_of_the_wrong_type_raise_type_error_naming_them(call, arg):
    # The kind of object is wrong, not its value: a TypeError, as Python and torch raise for a wrong type
    with pytest.raises(TypeError, match=f"`{arg}` must be a real number"):
        call(torch.ones(3))


def test_refused_inputs():
    with pytest.raises(TypeError, match="`input`"):
        gradguard.safe_log(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="`input`"):
        gradguard.safe_exp([1.0, 2.0])
    with pytest.raises(TypeError, match="`other`"):
        gradguard.safe_div(torch.ones(2), torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="`other`"):
        gradguard.safe_div(torch.ones(2), "2")
    with pytest.raises(RuntimeError):
        gradguard.safe_div(torch.ones(2), torch.ones(3))


@needs_ext
def test_cpu_kernel_refuses_what_it_cannot_serve():
    with pytest.raises(RuntimeError, match="`input` must be float16, bfloat16, float32 or float64"):
        ops.safe_log(torch.ones(3, dtype=torch.int32), 1e-3, False)
    with pytest.raises(RuntimeError, match="`other` has dtype"):
        ops.safe_div(torch.ones(3), torch.ones(3, dtype=torch.float64), 0.0, 0.0)
    with pytest.raises(RuntimeError, match="`eps` must be >= 0"):
        ops.safe_log(torch.ones(3), -1.0, False)
    with pytest.raises(RuntimeError, match="`out` has dtype"):
        ops.safe_exp.out(torch.ones(3), 1.0, False, out=torch.empty(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shape"):
        ops.safe_log_backward(torch.ones(3), torch.ones(4), 1e-3, False)
    x = torch.ones(10)
    with pytest.raises(RuntimeError):  # partial overlap of output and input
        ops.safe_log.out(x[1:], 1e-3, False, out=x[:-1])


# ---- the dispatcher contract: opcheck, compile, gradcheck ----------------------------------------

def _opcheck_cases():
    x = torch.rand(4, 5, dtype=torch.float64) + 0.1
    x[0, 0] = 0.0
    g = torch.randn(4, 5, dtype=torch.float64)
    o = torch.randn(5, dtype=torch.float64)
    o[1] = 0.0
    grad_x = x.detach().requires_grad_(True)
    return [
        (ops.safe_log.default, (grad_x, 1e-3, False)),
        (ops.safe_log.default, (grad_x, 1e-3, True)),
        (ops.safe_log.out, (x, 1e-3, False), {"out": torch.empty(4, 5, dtype=torch.float64)}),
        (ops.safe_log_backward.default, (g, x, 1e-3, False)),
        (ops.safe_exp.default, (grad_x, 1.0, False)),
        (ops.safe_exp.out, (x, 1.0, True), {"out": torch.empty(4, 5, dtype=torch.float64)}),
        (ops.safe_exp_backward.default, (g, x.exp(), x, 1.0, True)),
        (ops.safe_sqrt.default, (grad_x, 0.0)),
        (ops.safe_sqrt.out, (x, 0.0), {"out": torch.empty(4, 5, dtype=torch.float64)}),
        (ops.safe_sqrt_backward.default, (g, x, 1e-2)),
        (ops.safe_div.default, (grad_x, o.requires_grad_(True), 0.0, 0.0)),
        (ops.safe_div.default, (x.t(), x.t().contiguous(), 0.5, 2.0)),
        (ops.safe_div.out, (x, o.detach(), 0.0, 0.0), {"out": torch.empty(4, 5, dtype=torch.float64)}),
        (ops.safe_div_backward.default, (g, x, o.detach(), 0.0)),
        # A float16 input by a 0-dim float32 divisor (torch.div by a number).
        (ops.safe_div.default, (x.half().requires_grad_(True), torch.tensor(0.37, requires_grad=True), 0.0, 0.0)),
        (ops.safe_div.out, (x.half(), torch.tensor(0.37), 0.0, 2.0), {"out": torch.empty(4, 5, dtype=torch.float16)}),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, *kw = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kw[0] if kw else None)


def _fwd_bwd(x, y):
    return (gradguard.safe_log(x, 1e-3) + gradguard.safe_exp(x, 2.0, grad="straight_through")
            + gradguard.safe_sqrt(x) + gradguard.safe_div(x, y, eps=1e-3)).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    # Seeded, and no divisor near 0 but the guarded ones: an unseeded |y| ~ 1e-3 made one term
    # dominate the sum, and inductor's own log/exp moved it past assert_close's float32 tolerance
    # now and then.
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(64, generator=gen, dtype=torch.float32) * 4 - 1
    y = torch.randn(64, generator=gen)
    y = torch.where(y.abs() < 0.1, 0.5, y)
    y[::4] = 0.0
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = _fwd_bwd(xe, y)
    want.backward()
    got = torch.compile(_fwd_bwd, fullgraph=True, backend=backend)(xc, y)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("dynamic", [False, True, None])
def test_compile_fullgraph_bounds_as_arguments(dynamic):
    # Bounds that change between calls: recompiled, or symbolic floats (dynamic), never a break.
    def f(x, eps, m):
        return (gradguard.safe_log(x, eps) + gradguard.safe_exp(x, m, grad="straight_through")
                + gradguard.safe_sqrt(x, eps) + gradguard.safe_div(x, x.flip(0), eps=eps, fill=m))

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for n, eps, m in [(8, 1e-3, 2.0), (13, 1e-2, 3.0), (21, 0.5, 1.0)]:
        x = torch.rand(n) * 4 - 1
        assert_same_bits(cf(x, eps, m), f(x, eps, m))


def test_compile_fullgraph_out():
    torch._dynamo.reset()

    def f(x, y, o1, o2, o3, o4):
        gradguard.safe_log(x, 1e-3, out=o1)
        gradguard.safe_exp(x, 2.0, out=o2)
        gradguard.safe_sqrt(x, out=o3)
        gradguard.safe_div(x, y, out=o4)
        return o1 + o2 + o3 + o4

    x = torch.rand(64) * 4 - 1
    y = torch.randn(64)
    y[::4] = 0.0
    outs = [torch.empty(64) for _ in range(4)]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, *outs)
    want = [comp_log(x, 1e-3), comp_exp(x, 2.0), comp_sqrt(x), reference.safe_div(x, y, 0.0, 0.0)]
    for o, w in zip(outs, want):
        assert_same_bits(o, w)
    torch.testing.assert_close(got, sum(want[1:], want[0]))


def _away_from_kinks(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5)  # in [0.5, 3.5]


@pytest.mark.parametrize("mode", ["clamp", "straight_through"])
def test_gradcheck_and_gradgradcheck(mode):
    x = _away_from_kinks()
    # With clamp, the bounds put elements on each side, none within gradcheck's step of a kink.
    # Straight-through is not the derivative inside the clamped region (by design), so there
    # the bounds leave every element unclamped, where it is.
    x[:3] = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    x[3:6] = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    x = x.requires_grad_(True)
    eps, m = (0.4, 3.8) if mode == "clamp" else (0.05, 7.0)
    y = torch.linspace(-2, 2, 12, dtype=torch.float64)
    y[[2, 7]] = 0.0
    y = y.requires_grad_(True)
    cases = [
        (lambda t: gradguard.safe_log(t, eps, grad=mode), (x,)),
        (lambda t: gradguard.safe_exp(t, m, grad=mode), (x,)),
        # sqrt's zero gradient at and below eps is not the derivative either: keep x above it
        (lambda t: gradguard.safe_sqrt(t, 0.05), (x,)),
        # guarded divisors are exactly 0, so gradcheck's steps stay within eps of 0
        (lambda a, b: gradguard.safe_div(a, b, eps=0.05, fill=3.0), (x, y)),
        (lambda a, b: gradguard.safe_div(a, b, eps=0.05), (x.detach()[:1].clone().requires_grad_(True), y)),
    ]
    for fn, args in cases:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_double_backward_first_order_equals_fused():
    x = sample(torch.float32, specials=False).requires_grad_(True)
    for fn in (lambda t: gradguard.safe_log(t, 0.5), lambda t: gradguard.safe_exp(t, 2.0),
               gradguard.safe_sqrt, lambda t: gradguard.safe_div(t, t.detach().flip(0))):
        (g1,) = torch.autograd.grad(fn(x).sum(), x)
        (g2,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        assert_same_bits(g1, g2.detach())


# ---- the two paths are registered as they should be ----------------------------------------------

@needs_ext
def test_cpu_kernels_registered():
    for name in ("safe_log", "safe_exp", "safe_sqrt", "safe_div"):
        for op in (name, f"{name}.out", f"{name}_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradguard::{op}", "CPU"), op


def test_default_kernels_are_the_reference():
    # Under GRADGUARD_DISABLE_EXT=1 the dispatcher serves every op with these functions.
    for name in ("safe_log", "safe_exp", "safe_sqrt", "safe_div"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradguard::{name}", "CompositeExplicitAutograd")
    if not EXT_LOADED:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("gradguard::safe_log", "CPU")


_CPU_MODULE = "gradguard._C" in gradguard.backend()["modules"]


def test_one_autograd_kernel_per_forward_op():
    # The compiled module registers the forward ops' autograd in C++; the Python formulas are
    # registered only where it did not (registering both warned of an override at import).
    for name in ("safe_log", "safe_exp", "safe_sqrt", "safe_div"):
        dump = torch._C._dispatch_dump(f"gradguard::{name}")
        autograd = [line for line in dump.splitlines() if line.startswith("Autograd[alias]")]
        assert len(autograd) == 1, dump
        # The C++ formulas come with the CPU module (a CUDA module that loads alone has none).
        assert ("safe_math_autograd.cpp" in autograd[0]) == _CPU_MODULE, dump


def _python_calls_of(fn):
    """The Python functions of gradguard and of torch's custom-op machinery that run inside fn."""
    import sys
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if "/gradguard/" in path or "/torch/_library/" in path:
                seen.append(f"{path}:{frame.f_code.co_name}")
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.skipif(not _CPU_MODULE, reason="the compiled CPU module (which holds the C++ autograd) is not loaded")
def test_the_ops_and_their_backward_run_no_python_with_the_extension():
    # A Python autograd kernel cost 10 us per call without grad and ~55 us with it (the op's whole
    # cost on a small tensor, and a GPU's whole cost of the op below millions of elements).
    x = torch.rand(64, dtype=torch.float32) + 0.1
    y = torch.rand(64, dtype=torch.float32) + 0.1
    h = torch.rand(64, dtype=torch.float16) + 0.1
    calls = [
        lambda t: torch.ops.gradguard.safe_log(t, 1e-3, False),
        lambda t: torch.ops.gradguard.safe_exp(t, 3.0, True),
        lambda t: torch.ops.gradguard.safe_sqrt(t, 0.0),
        lambda t: torch.ops.gradguard.safe_div(t, y.requires_grad_(True), 0.0, 0.0),
    ]
    for call in calls:
        for requires_grad in (False, True):
            t = x.detach().requires_grad_(requires_grad)
            out = call(t)
            assert _python_calls_of(lambda: call(t)) == []
            if requires_grad:
                assert _python_calls_of(lambda: out.sum().backward()) == []
    hr = h.detach().requires_grad_(True)  # the mixed-dtype division: its formula in float32, in C++ too
    out = torch.ops.gradguard.safe_div(hr, torch.tensor(3.0), 0.0, 0.0)
    assert _python_calls_of(lambda: out.sum().backward()) == []
    assert_same_bits(hr.grad, (torch.ones(64) / 3.0).half())

_ISA_CHECK = """
import torch, gradguard
from test_safe_math import sample, assert_same_bits, comp_log, comp_exp, comp_sqrt, composite_grad
for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    for x in (sample(dt, n=70000, scale=30.0), sample(dt, n=3000).reshape(60, 50)[:, ::3]):
        g = torch.ones_like(x)
        for fn, comp in ((lambda t: gradguard.safe_log(t, 0.5), lambda t: comp_log(t, 0.5)),
                         (lambda t: gradguard.safe_exp(t, 3.0), lambda t: comp_exp(t, 3.0))):
            xr = x.detach().requires_grad_(True)
            y = fn(xr)
            y.backward(g)
            assert_same_bits(y.detach(), comp(x))
            assert_same_bits(xr.grad, composite_grad(comp, x, g))
        assert_same_bits(gradguard.safe_sqrt(x), comp_sqrt(x))
        d = x.flip(0)
        assert_same_bits(gradguard.safe_div(x, d, eps=0.5), gradguard.reference.safe_div(x, d, 0.5, 0.0))
        if dt.itemsize == 2:  # by a number: the float32 divisor's rows
            for v in (0.37, 0.0):
                assert_same_bits(gradguard.safe_div(x, v, fill=2.0), torch.where(x.isnan() | (v != 0), x / v, 2.0))
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_kernels_of_other_isas(isa):
    # This CPU runs the widest copy; the portable and avx2 copies run here in a subprocess.
    run_under_isa(_ISA_CHECK, isa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("other", [0.1, 3.3, 1e-3, 1e5, 1e-8, -2.5e-3, torch.tensor(0.1),
                                   torch.tensor(0.1, dtype=torch.float64)], ids=str)
def test_div_by_a_number_is_torch_div_exactly(dtype, other):
    """float16/bfloat16 by a number or a 0-dim CPU tensor of another dtype: torch.div divides in
    float32 by the divisor's float32 value. Rounded to the input's dtype first, 1e5 became inf in
    float16 (x / 1e5 gave 0), 1e-8 became 0 (the fill everywhere), and 0.1 put 10-60% of the
    results 1 ulp off."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = gradguard.safe_div(xa, other)
    want = torch.div(xb, other)
    assert y.dtype == want.dtype == dtype
    assert_same_bits(y.detach(), want.detach())
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(g)
    want.backward(g)
    assert_same_bits(xa.grad, xb.grad)
    out = torch.empty(4096, dtype=dtype)
    assert gradguard.safe_div(x, other, out=out) is out
    assert_same_bits(out, want.detach())


class BiggestFloat32(TorchDispatchMode):
    """Records the most elements of any float32 tensor an op made while it is active (the ops run
    inside an op's kernel, such as the reference kernel's, are not seen)."""
    biggest = 0

    def __enter__(self):
        BiggestFloat32.biggest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                BiggestFloat32.biggest = max(BiggestFloat32.biggest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_div_by_a_number_in_pieces_is_torch_div_exactly(dtype, layout, monkeypatch):
    """The float32 division of a float16/bfloat16 input by a float32 tensor: one pass in the
    compiled kernels, pieces of DIV_PIECE elements in the reference kernel and in the divisor's
    gradient (the whole-input float32 copies took 5x the input's memory): values, input gradients
    and out= bit for bit torch.div's across piece edges, the divisor's gradient within float32
    rounding, and no float32 tensor larger than a piece is made."""
    import gradguard.reference.safe_math as ref_sm

    monkeypatch.setattr(ref_sm, "DIV_PIECE", 7)

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 11, generator=gen).to(dtype)
    x = base if layout == "contiguous" else base.t()
    divisor = torch.tensor(0.37, requires_grad=True)  # float32: the float16 input is divided in float32
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    with BiggestFloat32():
        y = gradguard.safe_div(xa, divisor)
        y.backward(g)
    assert BiggestFloat32.biggest <= 7, BiggestFloat32.biggest
    d2 = divisor.detach().clone().requires_grad_(True)
    want = torch.div(xb, d2)
    want.backward(g)
    assert_same_bits(y.detach(), want.detach())
    assert_same_bits(xa.grad, xb.grad)
    # torch.div forms the divisor's gradient in the input's dtype (-5.15625 here in float16, where
    # float64 math gives -5.1402198); this one in float32 pieces summed in float64.
    exact = (-(g.double() * x.double()) / 0.37 ** 2).sum()
    torch.testing.assert_close(divisor.grad.double(), exact, rtol=1e-6, atol=0)
    out = torch.empty_like(x)
    assert gradguard.safe_div(x, 0.37, out=out) is out
    assert_same_bits(out, torch.div(x, 0.37))
    # A guarded divisor: fill everywhere, zero gradients (NaN input stays NaN).
    z = x.clone()
    z[0, 0] = math.nan
    r = gradguard.safe_div(z, 0.0, fill=2.0)
    assert torch.isnan(r[0, 0]) and bool((r.reshape(-1)[1:] == 2.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_div_by_a_number_in_pieces_behaves_as_torch_div_under_autograd(dtype, monkeypatch):
    # Found by reviewers in the first versions of the pieces: the layout of a transposed or
    # channels_last input, or of a view of one, was lost (and the input gradient's); an input changed in place after the call broke the backward
    # (it was saved although only the divisor's gradient needs it); the mixed second derivative
    # through a non-contiguous input was None (a contiguous copy was saved); a batched backward
    # (is_grads_batched) failed on copy_ under vmap.
    import gradguard.reference.safe_math as ref_sm

    monkeypatch.setattr(ref_sm, "DIV_PIECE", 7)
    gen = torch.Generator().manual_seed(5)
    channels_last = torch.randn(2, 3, 4, 6, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    for x in (torch.randn(11, 9, generator=gen).to(dtype).t(), channels_last, channels_last[..., ::2],
              torch.randn(11, 9, generator=gen).to(dtype).t()[:, ::2]):
        assert gradguard.safe_div(x, 0.37).stride() == torch.div(x, 0.37).stride()
        xa, xb = x.detach().requires_grad_(True), x.detach().clone().requires_grad_(True)
        g = torch.randn_like(torch.div(x, 0.37))  # in the result's layout
        got = torch.autograd.grad(gradguard.safe_div(xa, 0.37), xa, g)[0]
        want = torch.autograd.grad(torch.div(xb, 0.37), xb, g)[0]
        assert_same_bits(got, want)
        assert got.stride() == want.stride()
    w = torch.randn(6, generator=gen).to(dtype).requires_grad_(True)
    x = w * 1
    y = gradguard.safe_div(x, 0.37)
    x.add_(1)  # torch.div by a number does not save x either
    y.sum().backward()
    assert_same_bits(w.grad, torch.autograd.grad(torch.div(w, 0.37).sum(), w)[0])
    for fn in (gradguard.safe_div, torch.div):
        x = torch.randn(11, 9, generator=torch.Generator().manual_seed(6)).to(dtype).t().requires_grad_(True)
        d = torch.tensor(0.75, requires_grad=True)
        (gd,) = torch.autograd.grad(fn(x, d).sum(), d, create_graph=True)
        (gx,) = torch.autograd.grad(gd, x)
        torch.testing.assert_close(gx.float(), torch.full(x.shape, -1 / 0.75 ** 2), rtol=2e-3, atol=0)
    x = torch.randn(9, 11, generator=gen).to(dtype).requires_grad_(True)
    eye = torch.eye(99).to(dtype).view(-1, 9, 11)[:5]
    got = torch.autograd.grad(gradguard.safe_div(x, 0.37), x, eye, is_grads_batched=True)[0]
    assert_same_bits(got, torch.autograd.grad(torch.div(x, 0.37), x, eye, is_grads_batched=True)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["api", "op", "composite", "transformable"])
def test_div_input_changed_in_place_after_the_call_as_torch_div_allows(dtype, path):
    # torch.div saves its input only where the divisor needs a gradient: an input changed in place
    # after the call backpropagates there. safe_div saved it always (the custom op's C++ and Python
    # autograd, and the composites), and the backward raised torch's in-place error.
    from gradguard.reference.safe_math import safe_div_composite

    div = {"api": lambda a, d: gradguard.safe_div(a, d),
           "op": lambda a, d: torch.ops.gradguard.safe_div(a, d, 0.0, 0.0),
           "composite": lambda a, d: safe_div_composite(a, d, 0.0, 0.0),
           "transformable": lambda a, d: safe_div_composite(a, d, 0.0, 0.0, transforms=True)}[path]
    gen = torch.Generator().manual_seed(3)
    divisors = [torch.rand(3, 5, generator=gen).to(dtype) + 0.5, torch.rand(5, generator=gen).to(dtype) + 0.5]
    if path == "api":
        divisors.append(0.37)
    for d in divisors:
        for need in ((False, True) if isinstance(d, torch.Tensor) else (False,)):
            w = torch.randn(3, 5, generator=gen).to(dtype).requires_grad_(True)
            dd = d.detach().clone().requires_grad_(need) if isinstance(d, torch.Tensor) else d
            x = w * 1
            y = div(x, dd)
            x.add_(1)
            if need:  # the divisor's gradient needs the input: torch.div refuses too
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    y.sum().backward()
                continue
            y.sum().backward()
            want = torch.autograd.grad(torch.div(w, d).sum(), w)[0]
            assert_same_bits(w.grad, want)
    # The divisor's gradient, and its second derivative, still come (the input is saved there)
    x = torch.randn(4, generator=gen).to(dtype).requires_grad_(True)
    d = torch.rand(4, generator=gen).to(dtype).add(0.5).requires_grad_(True)
    (gd,) = torch.autograd.grad(div(x, d).sum(), d, create_graph=True)
    (gx,) = torch.autograd.grad(gd.sum(), x)
    torch.testing.assert_close(gd, -x.detach() / d.detach() ** 2, rtol=1e-2, atol=0)
    torch.testing.assert_close(gx, -1 / d.detach() ** 2, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_div_by_a_number_in_pieces_has_a_second_derivative(dtype, monkeypatch):
    # create_graph=True takes the differentiable composite on whole copies: the first derivative
    # is torch.div's bit for bit, and d/d(divisor) of its sum is -n / divisor^2 (torch.div's,
    # formed in the input's dtype, is -41.0 in float16 here, against -40.888...).
    import gradguard.reference.safe_math as ref_sm

    monkeypatch.setattr(ref_sm, "DIV_PIECE", 5)
    x = torch.randn(23, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
    d = torch.tensor(0.75, requires_grad=True)
    (gx,) = torch.autograd.grad(gradguard.safe_div(x, d).sum(), x, create_graph=True)
    (gd,) = torch.autograd.grad(gx.float().sum(), d)
    assert_same_bits(gx.detach(), torch.autograd.grad(torch.div(x, 0.75).sum(), x)[0])
    torch.testing.assert_close(gd.double(), torch.tensor(-23 / 0.75 ** 2, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_div_op_divides_a_16bit_input_by_a_float32_divisor(dtype, monkeypatch):
    """The op takes a float16/bfloat16 input with a 0-dim float32 divisor and divides as torch.div
    divides by a number: in float32, rounded once, in the input's dtype. Both kernels (the CPU
    one where built: one pass, AVX2 or portable; the reference, in float32 pieces, here of 4099
    elements), every 16-bit pattern at every position of the 16-wide loop and its tail, a view
    with short rows, out= in place, and the guard (fill, but a NaN input stays NaN)."""
    import gradguard.reference.safe_math as ref_sm

    monkeypatch.setattr(ref_sm, "DIV_PIECE", 4099)
    x = every_16bit_value(dtype)
    rows = x[: 60 * 1000].view(60, 1000)[:, 3:]
    kernels = [ref_sm.safe_div] + ([ops.safe_div] if EXT_LOADED else [])
    for d in (0.37, -3.3, 1e5, 1e-30, 3e38, math.inf, math.nan):
        y = torch.tensor(d, dtype=torch.float32)
        for kernel in kernels:
            for t in (x, rows, x[5:37], x[1::3]):
                assert_same_bits(kernel(t, y, 0.0, 0.0), torch.div(t, y))
        o = x.clone()
        ops.safe_div.out(o, y, 0.0, 0.0, out=o)
        assert_same_bits(o, torch.div(x, y))
    fill = torch.full_like(x, 2.5)
    for kernel in kernels:
        for d, eps in ((0.0, 0.0), (-1e-3, 1e-3)):
            assert_same_bits(kernel(x, torch.tensor(d), eps, 2.5), torch.where(x.isnan(), x, fill))
    # The backward op keeps one dtype; the op's autograd formula computes this case in float32.
    with pytest.raises(RuntimeError, match="`other` has dtype"):
        ops.safe_div_backward(x, x, torch.tensor(0.5), 0.0)
    for bad in (torch.ones(1), torch.tensor(0.5, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="0-dim float32 tensor with a float16/bfloat16"):
            ops.safe_div(x, bad, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="`other` has dtype"):
        ops.safe_div(x.float(), torch.tensor(0.5, dtype=dtype), 0.0, 0.0)
    # The op's own autograd formula (gradguard.safe_div runs a Function of its own): the input's
    # gradient is torch.div's, the divisor's the float32 formula's.
    gen = torch.Generator().manual_seed(7)
    xa = torch.randn(4099, generator=gen).to(dtype).requires_grad_(True)
    d = torch.tensor(0.37, requires_grad=True)
    g = torch.randn(4099, generator=gen).to(dtype)
    gx, gd = torch.autograd.grad(ops.safe_div(xa, d, 0.0, 0.0), (xa, d), g)
    assert_same_bits(gx, torch.div(g, 0.37))
    exact = -(g.double() * xa.detach().double()).sum() / 0.37 ** 2
    torch.testing.assert_close(gd.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_div_of_16bit_tensors_every_pattern(dtype):
    # float16/bfloat16 tensor by tensor: AVX2 rows where every operand is contiguous but a
    # broadcast divisor or incoming gradient (their c10 conversions left gcc's loop scalar: 25x
    # torch.div's time in float16). Every bit pattern against every other (shuffled), forward and both gradients,
    # a divisor contiguous, broadcast (stride 0) and 0-dim, the guard, rows of every tail length,
    # in place: bit for bit the reference's (the composite's roundings).
    a = every_16bit_value(dtype, repeat=2)
    b = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))]
    g = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(2))]
    ref = reference.safe_math
    for eps, fill in ((0.0, 0.0), (1e-3, 2.5), (0.5, math.nan)):
        for d in (b, b[:1].expand(a.numel()), b[7], b[:1]):
            assert_same_bits(ops.safe_div(a, d, eps, fill), ref.safe_div(a, d, eps, fill))
            full = d.expand(a.numel())
            for gg in (g, g[3].expand(a.numel())):  # the incoming gradient of a .sum() comes expanded
                for got, want in zip(ops.safe_div_backward(gg, a, full, eps), ref.safe_div_backward(gg, a, full, eps)):
                    assert_same_bits(got, want)
        rows = a[: 40 * 37].view(40, 37)[:, :-(eps > 0) - 1]  # rows shorter than 16 and not a multiple of it
        assert_same_bits(ops.safe_div(rows, b[: rows.shape[1]], eps, fill), ref.safe_div(rows, b[: rows.shape[1]], eps, fill))
    o = a.clone()
    ops.safe_div.out(o, b, 1e-3, 2.5, out=o)
    assert_same_bits(o, ref.safe_div(a, b, 1e-3, 2.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_div_by_a_number_makes_no_float32_copy(dtype, monkeypatch):
    """Forward and input gradient of a float16/bfloat16 safe_div by a number make no float32 tensor
    of more than one element with the extension (the op widens in registers; the input gradient
    is the op again): before, float32 pieces of DIV_PIECE elements. The reference kernel, called
    directly, stays within its pieces."""
    import gradguard.reference.safe_math as ref_sm

    monkeypatch.setattr(ref_sm, "DIV_PIECE", 7)

    x = torch.randn(9, 11, generator=torch.Generator().manual_seed(8)).to(dtype).requires_grad_(True)
    with BiggestFloat32():
        y = gradguard.safe_div(x, 0.37)
        y.backward(torch.ones_like(y))
    assert BiggestFloat32.biggest <= (1 if EXT_LOADED else 7), BiggestFloat32.biggest
    with BiggestFloat32():
        r = ref_sm.safe_div(x.detach(), torch.tensor(0.37), 0.0, 0.0)
    assert BiggestFloat32.biggest <= 7, BiggestFloat32.biggest
    assert_same_bits(r, torch.div(x.detach(), 0.37))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_div_gradient_of_a_0dim_operand_keeps_its_zero_sign(dtype):
    # A 0-dim operand's gradient was summed back to its shape (sum_to_size sums a 0-dim tensor):
    # -0.0 came back +0.0, where torch.div's is -0.0.
    for divisor in (math.inf, torch.tensor(math.inf, dtype=dtype)):
        xa = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        xb = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        g = torch.tensor(-1.0, dtype=dtype)
        assert_same_bits(torch.autograd.grad(gradguard.safe_div(xa, divisor), xa, g)[0],
                         torch.autograd.grad(torch.div(xb, divisor), xb, g)[0])
    x = torch.tensor(0.0, dtype=dtype)
    da = torch.tensor(2.0, dtype=dtype, requires_grad=True)
    db = torch.tensor(2.0, dtype=dtype, requires_grad=True)
    assert_same_bits(torch.autograd.grad(gradguard.safe_div(x, da), da, torch.tensor(1.0, dtype=dtype))[0],
                     torch.autograd.grad(torch.div(x, db), db, torch.tensor(1.0, dtype=dtype))[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_div_by_a_number_is_rounded_to_float32_once(dtype):
    # Found by a reviewer: a float just past float32's largest value (numpy prints its max as
    # 3.4028235e38) rounds down to it, but was taken as inf (the results NaN and 0); an integer
    # beyond 2^53 went through float64 to float32, rounded twice (64 of the bfloat16 patterns off).
    x = every_16bit_value(torch.bfloat16).to(dtype)
    for d in (3.4028235e38, -3.4028235e38, 3.4028235677973366e38, 2 ** 60 + 2 ** 36 + 1, -(2 ** 62 + 2 ** 38 + 3),
              2 ** 53 + 1, 7, 2 ** 63 + 2 ** 39 + 1, 2 ** 64 - 1, -2 ** 63):
        assert_same_bits(gradguard.safe_div(x, d), torch.div(x, d))


def test_div_op_result_has_the_inputs_dtype():
    # Found by a reviewer: a 0-dim CPU float16 input with a 0-dim float32 divisor elsewhere (meta
    # here, CUDA alike) was given a float32 result, laid out like the divisor.
    x0 = torch.tensor(1.5, dtype=torch.float16)
    for other in (torch.tensor(0.37), torch.tensor(0.37, device="meta")):
        r = ops.safe_div(x0, other, 0.0, 0.0)
        assert r.dtype == torch.float16 and r.device == other.device
    # The out= fake kernel refuses an `out` of another dtype, as the kernels do.
    m = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="`out` has dtype"):
        ops.safe_div.out(m, m, 0.0, 0.0, out=torch.empty(3, dtype=torch.float64, device="meta"))
    with pytest.raises(RuntimeError, match="`out` has dtype"):
        ops.safe_log.out(m, 1e-3, False, out=torch.empty(3, dtype=torch.float64, device="meta"))


def test_div_by_a_number_beyond_the_dtype_is_its_signed_inf():
    x = torch.tensor([1.0, -2.0, 0.0])
    assert_same_bits(gradguard.safe_div(x, 1e300), torch.div(x, 1e300))  # raised: cannot be converted
    assert_same_bits(gradguard.safe_div(x, -1e300), torch.div(x, -1e300))


def test_div_of_integers_by_float64_is_exact():
    a = torch.tensor([2 ** 24 + 1, 123456789], dtype=torch.int64)
    b = torch.ones(2, dtype=torch.float64)
    assert gradguard.safe_div(a, b).tolist() == torch.div(a, b).tolist() == [16777217.0, 123456789.0]


_FUNC_CASES = {
    "safe_log": (lambda x: gradguard.safe_log(x, 1e-3), lambda x: torch.log(x.clamp(min=1e-3))),
    "safe_exp": (lambda x: gradguard.safe_exp(x, 1.5), lambda x: torch.exp(x.clamp(max=1.5))),
    "safe_sqrt": (lambda x: gradguard.safe_sqrt(x, 1e-3), lambda x: torch.sqrt(x.clamp(min=1e-3))),
    "safe_div": (lambda x: gradguard.safe_div(x, x.flip(0) - 1.0), lambda x: x / (x.flip(0) - 1.0)),
}


@pytest.mark.parametrize("name", list(_FUNC_CASES))
def test_forward_mode_ad_and_torch_func_transforms(name):
    # The custom ops' autograd formula is reverse mode only: torch.func.jacfwd gave an all-zero
    # Jacobian without an error, forward_ad a None tangent, and grad/jacrev/hessian raised. These
    # take the composite, whose derivatives are the defined ones (here, away from every bound,
    # those of the plain expressions).
    fn, ref = _FUNC_CASES[name]
    x = torch.tensor([0.25, 0.5, 2.0, 1.25, 3.0], dtype=torch.float64)  # none at a bound or a pole
    want = torch.func.jacrev(ref)(x)
    torch.testing.assert_close(torch.func.jacfwd(fn)(x), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.jacrev(fn)(x), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.hessian(lambda v: fn(v).sum())(x),
                               torch.func.hessian(lambda v: ref(v).sum())(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(fn)(x.reshape(1, -1).repeat(3, 1)), ref(x).repeat(3, 1),
                               rtol=1e-15, atol=0)
    import torch.autograd.forward_ad as fwad
    t = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    with fwad.dual_level():
        got = fwad.unpack_dual(fn(fwad.make_dual(x, t))).tangent
    torch.testing.assert_close(got, want @ t, rtol=1e-12, atol=0)


def test_below_the_bound_forward_mode_gives_the_clamps_zero_derivative():
    x = torch.tensor([1e-5, 0.5], dtype=torch.float64)
    jac = torch.func.jacfwd(lambda v: gradguard.safe_log(v, 1e-3))(x)
    assert torch.equal(jac, torch.diag(torch.tensor([0.0, 2.0], dtype=torch.float64)))
    st = torch.func.jacfwd(lambda v: gradguard.safe_log(v, 1e-3, grad="straight_through"))(x)
    assert torch.equal(st, torch.diag(torch.tensor([1e3, 2.0], dtype=torch.float64)))


def test_forward_mode_safe_div_leaves_out_a_divisor_without_a_tangent():
    # torch hands the Function's jvp a zero tangent for a divisor that has none: where
    # x / c / c overflows (1e30 / 1e-5 / 1e-5 in float32) 0 * inf made the tangent NaN, for a
    # finite quotient, where torch.div's (and the reverse mode's) derivative is 1 / c.
    x = torch.tensor([1.0, 1e30, math.inf, math.nan])
    t = torch.ones_like(x)
    want = torch.full((4,), 1e5)
    for c in (1e-5, torch.full((4,), 1e-5)):
        got = torch.func.jvp(lambda v, c=c: gradguard.safe_div(v, c), (x,), (t,))[1]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        with torch.autograd.forward_ad.dual_level():
            dual = gradguard.safe_div(torch.autograd.forward_ad.make_dual(x, t), c)
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, want, rtol=1e-6, atol=0)
    # Both tangents given: the full derivative, as torch.div's.
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 4.0])
    got = torch.func.jvp(gradguard.safe_div, (a, b), (torch.ones(2), torch.ones(2)))[1]
    assert torch.equal(got, torch.func.jvp(torch.div, (a, b), (torch.ones(2), torch.ones(2)))[1])


@pytest.mark.parametrize("divisor_grad", [False, True])
@pytest.mark.parametrize("create_graph", [False, True])
def test_safe_div_gradient_is_zero_where_guarded_even_for_a_nan_upstream_gradient(divisor_grad, create_graph):
    # The input's gradient is 0 where |other| <= eps, in every autograd mode: a one-output
    # backward through safe_div itself (tried, then reverted) let a NaN upstream gradient through
    # there, since safe_div propagates a NaN input.
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    d = torch.tensor([0.0, 4.0], requires_grad=divisor_grad)
    g = torch.tensor([float("nan"), 1.0])
    (got,) = torch.autograd.grad(gradguard.safe_div(x, d, eps=1e-3), x, g, create_graph=create_graph)
    assert got.tolist() == [0.0, 0.25]

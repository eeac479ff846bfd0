"""Safe math under torch.compile (inductor, fullgraph=True): the ops lower to aten code that
inductor fuses (no gradguard custom op left in the graphs), with eager's values and gradients.

Under compile the public functions take the composite path (gradguard.reference.safe_math's
autograd Functions); eager keeps the custom ops (the C++ kernels, or the reference kernels with
GRADGUARD_DISABLE_EXT=1: this file runs on both). Values are compared with eager and with float64
math; they are not bit-identical, because inductor generates its own log/exp/sqrt (the README
gives the measured ulp differences). What must be exact is structural: NaN, +-inf and zero at
the same elements, and the gradient zero or passed at the same elements, the bound included.

Compiling is the cost here (seconds per graph on 2 cores), so every case of every dtype is one
graph compiled once per module, on small tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOAT_DTYPES
from test_safe_math import sample

import gradguard
from gradguard import reference
from gradguard.safe_math import EXP_MAX

# (name, function of (x, y) -> tensor). Bounds hit and not hit: the samples hold values below,
# at and above every bound (0.5 and 2.0 are put in explicitly; the default bounds are in
# `sample`'s specials), NaN, +-inf, zeros and -0.0.
CASES = [
    ("log", lambda x, y: gradguard.safe_log(x)),
    ("log eps=0.5", lambda x, y: gradguard.safe_log(x, 0.5)),
    ("log eps=0", lambda x, y: gradguard.safe_log(x, 0.0)),
    ("log straight_through", lambda x, y: gradguard.safe_log(x, 0.5, grad="straight_through")),
    ("exp", lambda x, y: gradguard.safe_exp(x)),
    ("exp max=2", lambda x, y: gradguard.safe_exp(x, 2.0)),
    ("exp straight_through", lambda x, y: gradguard.safe_exp(x, 2.0, grad="straight_through")),
    ("sqrt", lambda x, y: gradguard.safe_sqrt(x)),
    ("sqrt eps=0.5", lambda x, y: gradguard.safe_sqrt(x, 0.5)),
    ("div", lambda x, y: gradguard.safe_div(x, y)),
    ("div eps=0.5 fill=-1", lambda x, y: gradguard.safe_div(x, y, eps=0.5, fill=-1.0)),
    ("div broadcast", lambda x, y: gradguard.safe_div(x.view(8, -1), y.view(8, -1)[:1])),
]
N = 256


def _inputs(dtype, case=""):
    if case == "div broadcast":
        # Moderate values: the gradient of the broadcast operand is a sum over rows, and where
        # eager rounds each term to float16/bfloat16 (overflowing to inf), inductor keeps the
        # float32 intermediate of the fused sum, so huge terms would give inf vs -inf vs NaN.
        x = sample(dtype, n=N, scale=2.0, specials=False)
        y = sample(dtype, n=N, seed=2, scale=2.0, specials=False)
        y[::5] = 0.0
        y[1::7] = 0.5
        return x, y
    x = sample(dtype, n=N)
    x[40:44] = torch.tensor([0.5, 2.0, -0.5, 0.25], dtype=torch.float64).to(dtype)
    y = sample(dtype, n=N, seed=2, scale=2.0)
    y[::5] = 0.0
    y[1::7] = 0.5
    return x, y


def _all_cases(xs, ys):
    # Leaf k runs case k % len(CASES): every dtype's leaves run every case once.
    return [CASES[k % len(CASES)][1](x, y) for k, (x, y) in enumerate(zip(xs, ys))]


@pytest.fixture(scope="module")
def compiled_and_eager():
    """Each dtype's leaves (one per case, so that gradients do not mix), the eager and the
    compiled outputs and gradients. One inductor graph for all of them."""
    torch._dynamo.reset()
    leaves = {}
    for mode in ("eager", "compiled"):
        xs, ys = [], []
        for dt in FLOAT_DTYPES:
            for name, _ in CASES:
                x, y = _inputs(dt, name)
                xs.append(x.clone().requires_grad_(True))
                ys.append(y.clone().requires_grad_(True))
        leaves[mode] = (xs, ys)
    gs = [sample(x.dtype, n=N, seed=3, scale=1.0, specials=False) for x in leaves["eager"][0]]
    got = {}
    for mode, fn in (("eager", _all_cases), ("compiled", torch.compile(_all_cases, fullgraph=True))):
        xs, ys = leaves[mode]
        outs = fn(xs, ys)
        torch.autograd.backward(outs, [g.view(o.shape) for g, o in zip(gs, outs)])
        got[mode] = [(o.detach(), x.grad, y.grad) for o, x, y in zip(outs, xs, ys)]
    return leaves["eager"], gs, got


def _same_structure(got, want, what):
    for name, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf),
                       ("zero", lambda t: t == 0)):
        bad = (mask(got) != mask(want)).nonzero().flatten()[:5]
        assert bad.numel() == 0, f"{what}: {name} at other elements: {bad.tolist()} got {got.flatten()[bad].tolist()} " \
                                 f"want {want.flatten()[bad].tolist()}"


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6, torch.float64: 1e-13}


def _close(got, want, dtype, what, atol=0.0):
    # Both sides are rounded to `dtype`; a few ulps of the dtype apart (inductor's math functions
    # are not eager's), never more. Subnormal results have a fixed ulp: there the bound is 4 of it
    # (a product of two rounded factors, eager, vs one rounding, float64 or inductor's fused code).
    fi = torch.finfo(dtype)
    atol = max(atol, 4 * fi.tiny * fi.eps)
    torch.testing.assert_close(got.double(), want.double(), rtol=TOL[dtype], atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _reduced_atol(name, part, t, dtype):
    # The broadcast operand's gradient is a sum of 8 rows: eager rounds each term to the dtype
    # before summing, inductor sums the float32 terms, so the bound scales with the terms' size.
    if name == "div broadcast" and part == "grad other":
        return 8 * TOL[dtype] * t.abs().max().item()
    return 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_compiled_equals_eager(compiled_and_eager, dtype):
    _, _, got = compiled_and_eager
    k0 = FLOAT_DTYPES.index(dtype) * len(CASES)
    for k, (name, _) in enumerate(CASES):
        for part, c, e in zip(("value", "grad input", "grad other"), got["compiled"][k0 + k], got["eager"][k0 + k]):
            if e is None:
                assert c is None, (name, part)
                continue
            assert c.dtype == e.dtype == dtype and c.shape == e.shape, (name, part, c.dtype, c.shape, e.shape)
            _same_structure(c, e, f"{dtype} {name} {part}")
            _close(c, e, dtype, f"{dtype} {name} {part}", _reduced_atol(name, part, e, dtype))


def _ref64(name, x, y, g):
    """The definition in float64 (bounds rounded to x's dtype first, as clamp rounds them): value
    and gradient(s) through the reference kernels, which compose plain torch ops."""
    dt = x.dtype
    r = lambda v: float(torch.tensor(v, dtype=dt))  # noqa: E731
    x, y, g = x.detach().double(), y.detach().double(), g.double()
    st = "straight_through" in name
    if name.startswith("log"):
        e = r(torch.finfo(dt).tiny if name == "log" else 0.0 if "eps=0" in name and "0.5" not in name else 0.5)
        return reference.safe_log(x, e, st), reference.safe_log_backward(g, x, e, st), None
    if name.startswith("exp"):
        m = EXP_MAX[dt] if name == "exp" else 2.0
        res = reference.safe_exp(x, m, st)
        return res, reference.safe_exp_backward(g, res, x, m, st), None
    if name.startswith("sqrt"):
        e = 0.5 if "0.5" in name else 0.0
        return reference.safe_sqrt(x, e), reference.safe_sqrt_backward(g, x, e), None
    if name == "div broadcast":
        x, y, g = x.view(8, -1), y.view(8, -1)[:1], g.view(8, -1)
    e, f = (0.5, -1.0) if "0.5" in name else (0.0, 0.0)
    gi, go = reference.safe_div_backward(g, x, y, e)
    go = go.sum_to_size(y.shape)
    if name == "div broadcast":  # the leaf `other` is the 256 elements of which row 0 is used
        go = torch.cat([go.flatten(), torch.zeros(N - go.numel(), dtype=go.dtype)])
    return reference.safe_div(x, y, e, f), gi.sum_to_size(x.shape), go


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_compiled_against_float64(compiled_and_eager, dtype):
    (xs, ys), gs, got = compiled_and_eager
    k0 = FLOAT_DTYPES.index(dtype) * len(CASES)
    for k, (name, _) in enumerate(CASES):
        want = _ref64(name, xs[k0 + k], ys[k0 + k], gs[k0 + k])
        for part, c, w in zip(("value", "grad input", "grad other"), got["compiled"][k0 + k], want):
            if w is None:
                continue
            # The float64 result rounded to the dtype: finite ones that overflow it become inf,
            # as the dtype's own computation does.
            w = w.to(dtype).reshape(c.shape)
            _same_structure(c, w, f"{dtype} {name} {part} vs float64")
            _close(c, w, dtype, f"{dtype} {name} {part} vs float64", _reduced_atol(name, part, w, dtype))


def test_gradient_at_the_bound_and_at_nan_compiled():
    # The defined gradient, exactly: passed at x == eps / x == max (on every torch: 2.14's clamp
    # gives 0 there), zero below eps / above max and at NaN; straight-through passes everywhere.
    x = torch.tensor([0.5, 0.25, 1.0, math.nan, 2.0, 3.0])

    def f(a, b, c, d):  # one leaf per op: a compiled backward gets every output's tangent
        return (gradguard.safe_log(a, 0.5), gradguard.safe_log(b, 0.5, grad="straight_through"),
                gradguard.safe_exp(c, 2.0), gradguard.safe_sqrt(d, 0.5))

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [x.clone().requires_grad_(True) for _ in range(4)]
        torch.autograd.backward(fn(*leaves), [torch.ones(6)] * 4)
        grads.append([leaf.grad for leaf in leaves])
    for ge, gc in zip(*grads):
        torch.testing.assert_close(gc, ge, equal_nan=True)
    log_g, st_g, exp_g, sqrt_g = grads[1]
    assert log_g.tolist()[:4] == [2.0, 0.0, 1.0, 0.0]
    assert st_g[:3].tolist() == [2.0, 2.0, 1.0] and math.isnan(st_g[3])
    assert exp_g[4] == pytest.approx(math.exp(2.0)) and exp_g[5] == 0.0 and exp_g[3] == 0.0
    assert sqrt_g[0] == 0.0 and sqrt_g[2] == 0.5 and sqrt_g[3] == 0.0


def _aot_recorder(graphs):
    """A backend that keeps the forward and backward graphs AOTAutograd hands to a compiler
    (the graphs inductor would get) and runs them as they are."""
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _gradguard_nodes(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "gradguard" in str(n.target)]


def test_no_custom_op_in_compiled_graphs():
    # Inductor can fuse only what it sees: neither the forward nor the backward graph may hold a
    # gradguard op (an opaque kernel call is a fusion barrier).
    def loss(logits, target, d):
        p = torch.softmax(logits, dim=-1)
        nll = -gradguard.safe_log(p).gather(-1, target[:, None]).mean()
        return (nll + gradguard.safe_exp(logits, 3.0).mean() + gradguard.safe_sqrt(logits).mean()
                + gradguard.safe_div(logits, d, eps=1e-3).mean())

    graphs = []
    torch._dynamo.reset()
    cf = torch.compile(loss, fullgraph=True, backend=_aot_recorder(graphs))
    logits = torch.randn(4, 10, requires_grad=True)
    cf(logits, torch.tensor([1, 2, 3, 4]), torch.randn(10)).backward()
    assert len(graphs) == 2, "expected a forward and a backward graph"
    for gm in graphs:
        assert _gradguard_nodes(gm) == [], gm.code
    # Eager keeps the custom ops (the fused kernels): they are what a trace of an eager call records.
    from torch.fx.experimental.proxy_tensor import make_fx
    eager = make_fx(lambda x: gradguard.safe_log(x))(torch.rand(4))
    assert _gradguard_nodes(eager) == ["gradguard.safe_log.default"]


def test_out_compiled():
    # out= of the result's shape. (Resizing a wrong-shaped `out` is eager-only: the operand-alias
    # check before a resize reads storage pointers, which dynamo does not trace.)
    def f(x, y, o1, o2, o3, o4):
        gradguard.safe_log(x, 1e-3, out=o1)
        gradguard.safe_exp(x, 2.0, out=o2)
        gradguard.safe_sqrt(x, out=o3)
        gradguard.safe_div(x, y, out=o4)

    x, y = _inputs(torch.float32)
    outs_e = [torch.empty(N) for _ in range(4)]
    outs_c = [torch.empty(N) for _ in range(4)]
    f(x, y, *outs_e)
    torch.compile(f, fullgraph=True)(x, y, *outs_c)
    for c, e in zip(outs_c, outs_e):
        _same_structure(c, e, "out=")
        _close(c, e, torch.float32, "out=")


ERROR_CASES = [
    (lambda x: gradguard.safe_log(x.half(), 1e-8), ValueError, "`eps`=1e-08 is below the smallest positive value"),
    (lambda x: gradguard.safe_exp(x.half(), 100.0), ValueError, "`max`=100.0 is above"),
    (lambda x: gradguard.safe_sqrt(x, -1.0), ValueError, "`eps` must be >= 0"),
    (lambda x: gradguard.safe_log(x, math.inf), ValueError, "`eps` must be finite"),
    (lambda x: gradguard.safe_div(x.half(), x.half(), fill=1e10), ValueError, "`fill`=.* overflows"),
    (lambda x: gradguard.safe_log(x, grad="pass"), ValueError, "must be 'clamp' or 'straight_through'"),
    (lambda x: gradguard.safe_log(x, out=torch.empty(8, dtype=torch.float64)), RuntimeError,
     "`out` has dtype"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_errors_compiled(case):
    # An error eager raises is raised compiled too: the checks are Python on the arguments and
    # run while dynamo traces (backend="eager": the checks, not code generation, are under test).
    # With fullgraph=True dynamo reports it as torch._dynamo.exc.Unsupported ("Observed
    # exception") carrying the same message; without fullgraph the call falls back to eager and
    # raises the error itself.
    fn, exc, msg = ERROR_CASES[case]
    x = torch.rand(8)
    with pytest.raises(exc, match=msg):
        fn(x)
    torch._dynamo.reset()
    with pytest.raises(exc, match=msg):
        torch.compile(fn, backend="eager")(x)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=msg):
        torch.compile(fn, backend="eager", fullgraph=True)(x)


PROMOTION_CASES = [
    lambda a, b, h, s: gradguard.safe_log(a),            # integers to the default dtype
    lambda a, b, h, s: gradguard.safe_sqrt(a),
    lambda a, b, h, s: gradguard.safe_div(a, 3),         # int / number
    lambda a, b, h, s: gradguard.safe_div(h, b),         # float16 / float32 -> float32
    lambda a, b, h, s: gradguard.safe_div(h, s),         # a 0-dim float64 does not widen float16
    lambda a, b, h, s: gradguard.safe_div(s, a),         # 0-dim float64 / int tensor -> float64
]


def test_dtype_promotion_compiled():
    a = torch.arange(-3, 5)
    b = torch.tensor([0.0, 1.0, -2.0, 0.5, 4.0, 0.0, 3.0, 8.0])
    h = torch.linspace(-2, 2, 8, dtype=torch.float16)
    s = torch.tensor(0.25, dtype=torch.float64)
    torch._dynamo.reset()
    for fn in PROMOTION_CASES:
        want = fn(a, b, h, s)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(a, b, h, s)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masks_at_a_bound_the_dtype_rounds_compiled(dtype):
    """A bound that float16/bfloat16 cannot hold exactly (1e-3): compiled, the masks sit where
    eager's do, at the rounded bound. Inductor kept a float16/bfloat16 full() at the unrounded
    value: at x == bfloat16(1e-3) d safe_log/dx was 0 compiled and 1000 eager, and float16
    safe_div(1, y, eps=1e-3) at y == eps gave 999.5 instead of the fill."""
    b = torch.tensor(1e-3, dtype=dtype)
    below = torch.nextafter(b.float(), torch.tensor(0.0)).to(dtype)
    below = below if below < b else (b.float() * 0.99).to(dtype)
    x = torch.stack([b, below, (b.float() * 2).to(dtype)])

    def f(a, c, y):
        return (gradguard.safe_log(a, 1e-3), gradguard.safe_sqrt(c, 1e-3),
                gradguard.safe_div(torch.ones_like(y), y, eps=1e-3, fill=-7.0))

    outs, grads = [], []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [x.clone().requires_grad_(True) for _ in range(3)]
        res = fn(*leaves)
        torch.autograd.backward(res, [torch.ones(3, dtype=dtype)] * 3)
        outs.append(res)
        grads.append([leaf.grad for leaf in leaves])
    assert outs[0][2].tolist()[:2] == outs[1][2].tolist()[:2] == [-7.0, -7.0]
    for ge, gc in zip(*grads):
        assert ((ge == 0) == (gc == 0)).all(), (ge, gc)  # zero or passed at the same elements
    assert grads[1][0][0] != 0 and grads[1][0][1] == 0  # safe_log: passed at the bound, zero below


@pytest.mark.parametrize("strict", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hasattr(torch.compiler, "_is_exporting_flag"), reason="torch 2.6: strict export cannot be told from torch.compile"))])
def test_exported_programs_keep_the_defined_gradients(strict):
    # torch.export traced the compile path's composite: gradients by the plain clamp (inf for
    # safe_sqrt at 0), or, in strict mode, none at all through the safe ops. It keeps the
    # custom ops now.
    class M(torch.nn.Module):
        def forward(self, h):
            return (gradguard.safe_sqrt(h) + gradguard.safe_log(h, 0.5, grad="straight_through")
                    + gradguard.safe_exp(h, 2.0) + gradguard.safe_div(h, h - 1.0) + h)

    h = torch.tensor([0.0, 0.25, 1.0, 4.0], dtype=torch.float64)

    def grad_of(fn):
        hg = h.clone().requires_grad_(True)
        fn(hg).sum().backward()
        return hg.grad

    ep = torch.export.export(M(), (h,), strict=strict)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"gradguard.safe_sqrt.default", "gradguard.safe_log.default"} <= ops
    torch.testing.assert_close(grad_of(ep.module()), grad_of(M()), rtol=0, atol=0)
    assert grad_of(ep.module())[0] == 3.0  # sqrt's 0 at the bound + log's straight-through 2 + exp's 1


def test_changing_numbers_do_not_recompile_every_call():
    # A clipping schedule (max_norm per step) failed under fullgraph (math.isnan of a symbolic
    # float) and recompiled at every value; a divisor that changes per call (a token count)
    # recompiled safe_div every call (torch.full fixed it into the graph). As torch's own: the
    # first call's graph, then one dynamic graph.
    from torch._dynamo.utils import counters

    ps = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    cases = {
        "clip_grad_norm_": lambda mn: gradguard.clip_grad_norm_(ps, mn),
        "clip_grads_with_norm_": lambda mn: gradguard.clip_grads_with_norm_(
            ps, mn, gradguard.get_total_norm([p.grad for p in ps])),
        "safe_div": lambda n: gradguard.safe_div(ps[1].grad, n),
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        for i in range(5):
            for p in ps:
                p.grad = torch.ones_like(p)
            value = 1.0 + 0.1 * i
            got = compiled(value)
            if name == "safe_div":
                torch.testing.assert_close(got, torch.full((7,), 1.0 / value))
            else:
                torch.testing.assert_close(ps[0].grad, torch.full((6, 5), min(1.0, value / (37 ** 0.5 + 1e-6))))
        assert counters["stats"]["unique_graphs"] <= 2, (name, counters["stats"]["unique_graphs"])


def test_the_ops_compiled_with_dynamic_shapes_trace_once():
    # The ops themselves under torch.compile (the public functions take the composite there, but a
    # library may call torch.ops.gradguard.* directly), forward and backward: the C++ autograd's
    # safe_div backward read the operands' sizes as integers, which pinned every size (a recompile
    # per shape, and a dim marked dynamic refused as specialized). One graph, as with the Python
    # autograd, and mark_dynamic honoured.
    from torch._dynamo.testing import CompileCounterWithBackend

    ops = torch.ops.gradguard
    fns = {
        "safe_div broadcast": lambda a, b: ops.safe_div(a, b, 0.0, 0.0),
        "safe_div same shape": lambda a, b: ops.safe_div(a, a * b, 0.0, 0.0),
        "safe_log": lambda a, b: ops.safe_log(a, 1e-3, False) * b,
    }
    for name, fn in fns.items():
        torch._dynamo.reset()
        count = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=count, dynamic=True)
        for n in range(3, 7):
            a = (torch.rand(n, n + 1) + 0.1).requires_grad_(True)
            b = (torch.rand(n + 1) + 0.5).requires_grad_(True)
            compiled(a, b).sum().backward()
            ga, gb = a.grad, b.grad
            a.grad = b.grad = None
            fn(a, b).sum().backward()
            torch.testing.assert_close(ga, a.grad)
            torch.testing.assert_close(gb, b.grad)
        assert count.frame_count == 1, (name, count.frame_count)
    torch._dynamo.reset()
    a = (torch.rand(6, 5) + 0.1).requires_grad_(True)
    b = (torch.rand(5) + 0.5).requires_grad_(True)
    torch._dynamo.mark_dynamic(a, 0)
    torch.compile(fns["safe_div broadcast"], backend="aot_eager")(a, b).sum().backward()
    assert a.grad.shape == (6, 5) and b.grad.shape == (5,)


def test_divisors_past_float32s_range_do_not_recompile():
    # Found by a reviewer: every divisor past float32's largest value recompiled (a guard on its
    # value), and with fullgraph=True the ninth failed; an integer constant beyond 2^53 was
    # rounded twice (through float64). As torch.div: one graph, then one dynamic one.
    from torch._dynamo.utils import counters

    for dtype in (torch.float16, torch.float32):
        torch._dynamo.reset()
        counters.clear()
        x = torch.randn(8, generator=torch.Generator().manual_seed(0)).to(dtype)
        f = torch.compile(lambda x, d: gradguard.safe_div(x, d), fullgraph=True, backend="aot_eager")
        for d in (0.37, 0.41, 1e39, 2e39, -1e39, 1e300, 3.4028235e38, 3.4028235677973366e38, -7.5):
            assert torch.equal(f(x, d), torch.div(x, d)), d
        assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    x = torch.tensor([2.0 ** 60, 3.0])
    d = 2 ** 60 + 2 ** 36 + 1
    got = torch.compile(lambda x: gradguard.safe_div(x, d), fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, torch.div(x, d))


@pytest.mark.parametrize("transform", ["grad", "jacfwd", "hessian"])
def test_torch_func_inside_compile_takes_the_defined_gradients(transform):
    # Under torch.func inside torch.compile dynamo differentiates the composite's forward, not
    # its backward: safe_sqrt's gradient at 0 came out inf, a straight-through one 0 below the
    # bound. The forwards now differentiate to the defined gradients (values unchanged).
    x = torch.tensor([-1.0, 0.0, 1e-5, 0.5, 2.0, 3.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1e-5, 0.5, 0.0, -3.0, 2.0], dtype=torch.float64)

    def f(v):
        out = (gradguard.safe_sqrt(v) + gradguard.safe_sqrt(v, 1e-3) + gradguard.safe_log(v, 1e-3)
               + gradguard.safe_log(v, 1e-3, grad="straight_through")
               + gradguard.safe_exp(v, 2.0) + gradguard.safe_exp(v, 2.0, grad="straight_through"))
        if transform != "hessian":
            # Not in the hessian: safe_div's Function fails to compile under its vmap (README),
            # and eps=0's straight-through second derivative below 0 is inf times 0.
            out = out + gradguard.safe_div(v, y, eps=1e-3) + gradguard.safe_log(v, 0.0, grad="straight_through")
        return out.sum()

    fn = {"grad": torch.func.grad(f), "jacfwd": torch.func.jacfwd(f), "hessian": torch.func.hessian(f)}[transform]
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(x), fn(x), equal_nan=True)


@pytest.mark.parametrize("transform", ["jvp", "grad", "jvp_divisor"])
def test_safe_div_of_a_nan_by_a_guarded_divisor_differentiates_to_zero_inside_compile(transform):
    # The compile path's forward divided a NaN numerator by the guarded divisor itself: its
    # tangent under torch.compile(jvp) was t / 0 = inf, where the defined derivative (and eager's)
    # is 0 wherever |other| <= eps.
    x = torch.tensor([-1.0, -math.inf, 0.5, math.nan, math.nan, 2.0], dtype=torch.float64)
    d = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0, 1e-9], dtype=torch.float64)
    t = torch.ones_like(x)

    def f(v, w):
        return gradguard.safe_div(v, w, eps=1e-6)

    if transform == "jvp":
        fn = lambda a, b, c: torch.func.jvp(lambda u: f(u, b), (a,), (c,))[1]  # noqa: E731
        args = (x, d, t)
    elif transform == "jvp_divisor":  # through a quotient by the guarded divisor replaced by 1: 0 * NaN
        fn = lambda a, b, c: torch.func.jvp(lambda w: f(a, w), (b,), (c,))[1]  # noqa: E731
        args = (x, d, t)
    else:
        fn = lambda a, b: torch.func.grad(lambda u: f(u, b).nansum())(a)  # noqa: E731
        args = (x, d)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    want = fn(*args)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.equal(got[[0, 1, 2, 3, 5]], torch.zeros(5, dtype=torch.float64)), got  # guarded divisors
    # The values: bit for bit eager's (a NaN input over a guarded divisor stays that NaN).
    torch._dynamo.reset()
    v = torch.compile(f, backend="aot_eager", fullgraph=True)(x, d)
    assert torch.equal(v.view(torch.int64), f(x, d).view(torch.int64)), (v, f(x, d))


def test_straight_through_log_with_an_eps_whose_inverse_overflows_compiled():
    # The compile path adds the straight-through ramp below the bound as ramp / eps: multiplied by
    # 1 / eps, that was inf in float16 for eps < 1.5e-5 (and for subnormal eps in the other
    # dtypes), and 0 * inf made every clamped value NaN.
    a = torch.tensor([-1.0, 0.0, 1e-7, 0.5], dtype=torch.float16, requires_grad=True)
    b = torch.tensor([-1.0, 0.0, 1e-41, 0.5], dtype=torch.float32, requires_grad=True)

    def f(a, b):
        return (gradguard.safe_log(a, 1e-6, grad="straight_through"),
                gradguard.safe_log(b, 1e-39, grad="straight_through"))

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(a, b)
    want = f(a, b)
    for g, w, x in zip(got, want, (a, b)):
        assert not torch.isnan(g).any(), g
        torch.testing.assert_close(g, w)
        (gg,) = torch.autograd.grad(g.sum(), x, retain_graph=True)
        (gw,) = torch.autograd.grad(w.sum(), x, retain_graph=True)
        assert torch.equal(gg, gw), (gg, gw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_sqrt_gradient_divides_by_the_rounded_root_as_the_compiled_composite(dtype):
    # The compile path's backward took the root afresh, which inductor keeps in float32: an ulp
    # off the compiled composite's gradient (and eager's) in float16/bfloat16, which divide by
    # the stored root (15.8046875 for 15.8125 at float16 1e-3). Now from the forward's result.
    x0 = torch.logspace(-4, 4, 997, dtype=torch.float64).to(dtype)
    grads = []
    for fn in (lambda x: gradguard.safe_sqrt(x), lambda x: torch.sqrt(torch.clamp(x, min=0))):
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(torch.compile(fn, fullgraph=True)(x).sum(), x)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]), (grads[0] != grads[1]).sum()

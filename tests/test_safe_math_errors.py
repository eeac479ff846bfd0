"""Safe math on bad input: operands on other devices (meta) refused as torch.div refuses them,
`out=` that is also an operand needing a resize, bounds the dtype cannot hold, sparse and nested
tensors. Each case runs through the public API, the dispatcher op (the compiled kernel where it is
loaded, else the reference) and the reference kernel itself, so both paths are held to one rule.
The CUDA cases (a 0-dim CPU operand, a Python-number divisor without a host-to-device copy) skip
without a GPU."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradguard
from gradguard.reference import safe_math as ref
from gradguard.safe_math import EXP_MAX

ops = torch.ops.gradguard
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def needs_cuda(test):
    """Skipped without a GPU; marked `cuda`, so that benchmarks/gpu_check.sh runs it."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def meta(*shape):
    return torch.empty(*shape, device="meta")


# ---- devices ------------------------------------------------------------------------------------

def _cpu():
    return torch.rand(3) + 0.5


DEVICE_CASES = {
    "safe_div(cpu, meta)": lambda: gradguard.safe_div(_cpu(), meta(3)),
    "safe_div(meta, cpu)": lambda: gradguard.safe_div(meta(3), _cpu()),
    "safe_log(meta, out=cpu)": lambda: gradguard.safe_log(meta(3), out=torch.empty(3)),
    "safe_exp(cpu, out=meta)": lambda: gradguard.safe_exp(_cpu(), out=meta(3)),
    "safe_sqrt(cpu, out=meta)": lambda: gradguard.safe_sqrt(_cpu(), out=meta(3)),
    "safe_div(cpu, cpu, out=meta)": lambda: gradguard.safe_div(_cpu(), _cpu(), out=meta(3)),
    "op safe_div(cpu, meta)": lambda: ops.safe_div(_cpu(), meta(3), 0.0, 0.0),
    "op safe_div(meta, cpu)": lambda: ops.safe_div(meta(3), _cpu(), 0.0, 0.0),
    "op safe_log.out(meta, out=cpu)": lambda: ops.safe_log.out(meta(3), 1e-6, False, out=torch.empty(3)),
    "op safe_log.out(cpu, out=meta)": lambda: ops.safe_log.out(_cpu(), 1e-6, False, out=meta(3)),
    "op safe_exp.out(meta, out=cpu)": lambda: ops.safe_exp.out(meta(3), 1.0, False, out=torch.empty(3)),
    "op safe_sqrt.out(meta, out=cpu)": lambda: ops.safe_sqrt.out(meta(3), 0.0, out=torch.empty(3)),
    "op safe_div.out(cpu, cpu, out=meta)": lambda: ops.safe_div.out(_cpu(), _cpu(), 0.0, 0.0, out=meta(3)),
    "op safe_log_backward(cpu, meta)": lambda: ops.safe_log_backward(_cpu(), meta(3), 1e-6, False),
    "op safe_log_backward(meta, cpu)": lambda: ops.safe_log_backward(meta(3), _cpu(), 1e-6, False),
    "op safe_exp_backward(cpu, meta, cpu)": lambda: ops.safe_exp_backward(_cpu(), meta(3), _cpu(), 1.0, False),
    "op safe_exp_backward(cpu, cpu, meta)": lambda: ops.safe_exp_backward(_cpu(), _cpu(), meta(3), 1.0, True),
    "op safe_exp_backward(meta, cpu, cpu)": lambda: ops.safe_exp_backward(meta(3), _cpu(), _cpu(), 1.0, False),
    "op safe_sqrt_backward(cpu, meta)": lambda: ops.safe_sqrt_backward(_cpu(), meta(3), 0.0),
    "op safe_div_backward(cpu, cpu, meta)": lambda: ops.safe_div_backward(_cpu(), _cpu(), meta(3), 0.0),
    "op safe_div_backward(cpu, meta, cpu)": lambda: ops.safe_div_backward(_cpu(), meta(3), _cpu(), 0.0),
    "op safe_div_backward(meta, cpu, cpu)": lambda: ops.safe_div_backward(meta(3), _cpu(), _cpu(), 0.0),
    "ref safe_div(cpu, meta)": lambda: ref.safe_div(_cpu(), meta(3), 0.0, 0.0),
    "ref safe_log_out(meta, out=cpu)": lambda: ref.safe_log_out(meta(3), 1e-6, False, out=torch.empty(3)),
    "ref safe_div_backward(meta, cpu, cpu)": lambda: ref.safe_div_backward(meta(3), _cpu(), _cpu(), 0.0),
    "ref safe_exp_backward(cpu, meta, cpu)": lambda: ref.safe_exp_backward(_cpu(), meta(3), _cpu(), 1.0, False),
}


def test_torch_div_refuses_the_same_mix():
    with pytest.raises(RuntimeError):
        torch.div(_cpu(), meta(3))


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_operands_on_another_device_are_refused(case):
    with pytest.raises(RuntimeError, match="expected all tensors to be on the same device"):
        DEVICE_CASES[case]()


def test_a_refused_out_is_left_as_it_was():
    out = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="same device"):
        gradguard.safe_log(meta(3), out=out)
    assert out.shape == (4,) and torch.equal(out, torch.arange(4.0))


@pytest.mark.parametrize("path", ["api", "op", "ref"])
def test_a_zero_dim_cpu_operand_goes_with_any_device_as_in_torch_div(path):
    fn = {"api": lambda a, b: gradguard.safe_div(a, b), "op": lambda a, b: ops.safe_div(a, b, 0.0, 0.0),
          "ref": lambda a, b: ref.safe_div(a, b, 0.0, 0.0)}[path]
    for a, b in [(torch.tensor(2.0), meta(3)), (meta(3), torch.tensor(2.0)), (torch.tensor(2.0), meta(()))]:
        want = torch.div(a, b)
        got = fn(a, b)
        assert got.device == want.device and got.shape == want.shape


# ---- out= that is also an operand ---------------------------------------------------------------

def _ab():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)


def test_torch_div_refuses_an_operand_out_that_must_grow():
    a, b = _ab()
    with pytest.raises(RuntimeError):
        torch.div(a, b, out=b)


@pytest.mark.parametrize("path", ["api", "op", "ref"])
def test_out_aliasing_an_operand_that_must_broadcast_raises_and_keeps_it(path):
    a, b = _ab()
    before = b.clone()
    call = {"api": lambda: gradguard.safe_div(a, b, out=b),
            "op": lambda: ops.safe_div.out(a, b, 0.0, 0.0, out=b),
            "ref": lambda: ref.safe_div_out(a, b, 0.0, 0.0, out=b)}[path]
    with pytest.raises(RuntimeError, match="`out` with shape \\[3\\] is also an operand"):
        call()
    assert b.shape == (3,) and torch.equal(bits(b), bits(before))


def test_out_aliasing_a_view_of_the_operand_with_another_shape_raises():
    x = torch.rand(4, dtype=torch.float64) + 0.5
    before = x.clone()
    with pytest.raises(RuntimeError, match="also an operand"):
        gradguard.safe_log(x, out=x[:2])
    with pytest.raises(RuntimeError, match="also an operand"):
        ops.safe_log.out(x, 1e-6, False, out=x[:2])
    assert torch.equal(x, before)


@pytest.mark.parametrize("path", ["api", "op"])
def test_out_that_is_an_operand_of_the_broadcast_shape_works(path):
    a, b = _ab()
    want = a / b  # float64: the reference of the exact quotient
    if path == "api":
        gradguard.safe_div(a, b, out=a)
    else:
        ops.safe_div.out(a, b, 0.0, 0.0, out=a)
    assert torch.equal(a, want)
    x = torch.rand(5, dtype=torch.float64) + 0.5
    want = torch.log(x)
    gradguard.safe_log(x, out=x)
    assert torch.equal(x, want)


def _out_overlapping_a_non_dense_input(path, device):
    # A partial overlap between non-dense views of one storage, which TensorIterator cannot see
    # (get_overlap_status: TooHard): the kernels read elements they had already overwritten
    # (8242 of 16000 wrong for safe_log). Computed through a temporary now, as the composite.
    def case():
        base = torch.rand(2, 9000, generator=torch.Generator().manual_seed(3)) + 0.5
        base[:, ::3] = -1.0
        base = base.to(device)
        return base, base[:, :8000], base[:, 1:8001]

    calls = {
        "safe_log": (lambda x, o: gradguard.safe_log(x, 0.25, out=o), lambda x: torch.log(torch.clamp(x, min=0.25)),
                     lambda x, o: o.copy_(ref.safe_log(x, 0.25, False))),
        "safe_exp": (lambda x, o: gradguard.safe_exp(x, 0.75, out=o), lambda x: torch.exp(torch.clamp(x, max=0.75)),
                     lambda x, o: o.copy_(ref.safe_exp(x, 0.75, False))),
        "safe_sqrt": (lambda x, o: gradguard.safe_sqrt(x, out=o), lambda x: torch.sqrt(torch.clamp(x, min=0.0)),
                      lambda x, o: o.copy_(ref.safe_sqrt(x, 0.0))),
        "safe_div": (lambda x, o: gradguard.safe_div(x, x.flip(1), eps=0.6, out=o),
                     lambda x: ref.safe_div(x, x.flip(1), 0.6, 0.0),
                     lambda x, o: o.copy_(ref.safe_div(x, x.flip(1), 0.6, 0.0))),
    }
    for name, (api, want_fn, via_ref) in calls.items():
        base, x, out = case()
        want = want_fn(x.clone())
        (api if path == "api" else via_ref)(x, out)
        assert torch.equal(out, want), (name, int((out != want).sum()))


@pytest.mark.parametrize("path", ["api", "ref"])
def test_out_overlapping_a_non_dense_input_gets_the_composites_values(path):
    _out_overlapping_a_non_dense_input(path, "cpu")


@needs_cuda
def test_out_overlapping_a_non_dense_input_gets_the_composites_values_cuda():
    _out_overlapping_a_non_dense_input("api", "cuda")


# ---- bounds the dtype cannot hold --------------------------------------------------------------

BOUND_CASES = [
    # (op, dtype, bound argument, value, message)
    ("safe_log", torch.float16, "eps", 1e-8, "rounds to 0"),
    ("safe_log", torch.bfloat16, "eps", 1e-45, "rounds to 0"),
    ("safe_log", torch.float32, "eps", 1e300, "overflows to inf"),
    ("safe_log", torch.float16, "eps", 1e5, "overflows to inf"),
    ("safe_sqrt", torch.float16, "eps", 1e-9, "rounds to 0"),
    ("safe_sqrt", torch.float32, "eps", 1e39, "overflows to inf"),
    ("safe_exp", torch.float16, "max", 1e10, "overflows to inf"),
    ("safe_exp", torch.float32, "max", -1e300, "overflows to -inf"),
    ("safe_div", torch.float16, "fill", 1e10, "overflows to inf"),
    ("safe_div", torch.float16, "fill", -7e4, "overflows to -inf"),
    ("safe_div", torch.float32, "eps", 1e300, "overflows to inf"),
    ("safe_div", torch.float16, "eps", 1e-9, "rounds to 0"),
    # float32 rounds 1e-45 up to its smallest subnormal (1.4e-45): the message said "rounds to 0"
    ("safe_log", torch.float32, "eps", 1e-45, "is below the smallest positive value of"),
    # An infinite eps was taken: safe_log gave inf everywhere, safe_div its fill everywhere.
    ("safe_log", torch.float32, "eps", math.inf, "must be finite"),
    ("safe_sqrt", torch.bfloat16, "eps", math.inf, "must be finite"),
    ("safe_div", torch.float64, "eps", math.inf, "must be finite"),
]


def _call_op(op, kind, x, arg, value):
    """The op with `value` for `arg` (other bounds harmless), through the dispatcher or the reference."""
    lib = ops if kind == "op" else None
    if op == "safe_div":
        eps, fill = (value, 0.0) if arg == "eps" else (0.0, value)
        return ops.safe_div(x, x, eps, fill) if lib else ref.safe_div(x, x, eps, fill)
    if op == "safe_sqrt":
        return ops.safe_sqrt(x, value) if lib else ref.safe_sqrt(x, value)
    return getattr(ops, op)(x, value, False) if lib else getattr(ref, op)(x, value, False)


@pytest.mark.parametrize("case", range(len(BOUND_CASES)))
@pytest.mark.parametrize("path", ["api", "op", "ref"])
def test_bound_that_does_not_survive_the_cast_is_an_error(path, case):
    op, dtype, arg, value, msg = BOUND_CASES[case]
    x = torch.rand(4).to(dtype)
    if path == "api":
        fn = getattr(gradguard, op)
        call = (lambda: fn(x, x, **{arg: value})) if op == "safe_div" else (lambda: fn(x, **{arg: value}))
    else:
        call = lambda: _call_op(op, path, x, arg, value)  # noqa: E731
    if path == "api" and op == "safe_exp" and value > 0:
        msg = "whose exp is finite"  # the API's stricter rule for max fires first
    with pytest.raises(ValueError, match=f"`{arg}`.*{msg}"):
        call()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bounds_at_the_edge_of_the_dtype_are_accepted_and_agree(dtype):
    fi = torch.finfo(dtype)
    smallest = fi.tiny * fi.eps
    x = torch.tensor([0.0, 1.0, 2.0, -1.0]).to(dtype)
    z = torch.zeros(4, dtype=dtype)
    cases = [
        ("safe_log eps", lambda k: _call_op("safe_log", k, x, "eps", smallest)),
        ("safe_div fill", lambda k: _call_op("safe_div", k, z, "fill", fi.max)),
        ("safe_div fill", lambda k: _call_op("safe_div", k, z, "fill", -fi.max)),
        ("safe_div eps", lambda k: _call_op("safe_div", k, x, "eps", smallest)),
        ("safe_exp max", lambda k: _call_op("safe_exp", k, x, "max", -fi.max)),
    ]
    for name, fn in cases:
        got, want = fn("op"), fn("ref")
        assert torch.equal(bits(got), bits(want)), name
        assert not torch.isinf(got).any(), name
    # the first double past each limit is refused by both paths
    for kind in ("op", "ref"):
        if dtype == torch.float64:
            break  # no float64 double lies past float64's own limits
        with pytest.raises(ValueError, match="overflows to inf"):
            _call_op("safe_div", kind, z, "fill", math.nextafter(fi.max, math.inf))
        with pytest.raises(ValueError, match="rounds to 0"):
            _call_op("safe_log", kind, x, "eps", math.nextafter(smallest, 0.0))
    # float64 value of the result: log of the smallest positive value, never -inf
    y = gradguard.safe_log(torch.zeros(2, dtype=dtype), eps=smallest)
    torch.testing.assert_close(y.double(), torch.full((2,), math.log(smallest), dtype=torch.float64),
                               rtol=fi.eps, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_safe_exp_max_above_the_finite_limit_is_an_error(dtype):
    x = torch.tensor([0.0, 1e3]).to(dtype)
    y = gradguard.safe_exp(x, max=EXP_MAX[dtype])
    assert torch.isfinite(y).all()
    above = math.nextafter(EXP_MAX[dtype], math.inf)
    for m in (above, 100.0 if dtype == torch.float16 else 1e3, math.inf):
        with pytest.raises(ValueError, match=r"`max`.*whose exp is finite"):
            gradguard.safe_exp(x, max=m)


def test_extension_and_reference_agree_on_eps_1e300():
    # Before: the extension returned inf and the reference raised on this call.
    x = torch.rand(3)
    for fn in (lambda: ops.safe_log(x, 1e300, False), lambda: ref.safe_log(x, 1e300, False)):
        with pytest.raises(ValueError, match="`eps`=1e\\+300 overflows to inf"):
            fn()


def test_nonfinite_bounds_keep_their_documented_meaning():
    x = torch.tensor([0.0, 1.0, -2.0])
    assert torch.equal(gradguard.safe_div(x, torch.zeros(3), fill=math.inf), torch.tensor([math.inf] * 3))
    assert torch.isnan(gradguard.safe_div(x, torch.zeros(3), fill=math.nan)).all()
    assert torch.equal(gradguard.safe_log(torch.zeros(1), eps=0.0), torch.tensor([-math.inf]))


# ---- sparse and nested input ---------------------------------------------------------------------

LAYOUT_CASES = {
    "safe_log(sparse_coo)": (lambda: gradguard.safe_log(torch.eye(3).to_sparse()), "input", "sparse"),
    "safe_exp(sparse_csr)": (lambda: gradguard.safe_exp(torch.eye(3).to_sparse_csr()), "input", "sparse"),
    "safe_sqrt(nested)": (lambda: gradguard.safe_sqrt(torch.nested.nested_tensor(
        [torch.ones(2), torch.ones(3)], layout=torch.jagged)), "input", "nested"),
    "safe_div(sparse, dense)": (lambda: gradguard.safe_div(torch.eye(3).to_sparse(), torch.ones(3)), "input", "sparse"),
    "safe_div(dense, sparse)": (lambda: gradguard.safe_div(torch.ones(3), torch.eye(3).to_sparse()), "other", "sparse"),
    "safe_log(out=sparse)": (lambda: gradguard.safe_log(torch.ones(3), out=torch.zeros(3).to_sparse()), "out", "sparse"),
    # An MKLDNN tensor was called sparse; a quantized one failed in torch naming no argument.
    "safe_log(mkldnn)": (lambda: gradguard.safe_log(torch.rand(3, 3).to_mkldnn()), "input", "MKLDNN"),
    "safe_exp(quantized)": (lambda: gradguard.safe_exp(torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)),
                            "input", "quantized"),
    "safe_div(dense, quantized)": (lambda: gradguard.safe_div(torch.rand(3), torch.quantize_per_tensor(
        torch.rand(3), 0.1, 0, torch.quint8)), "other", "quantized"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_sparse_and_nested_input_is_a_type_error_naming_the_argument(case):
    fn, arg, kind = LAYOUT_CASES[case]
    with pytest.raises(TypeError, match=f"`{arg}` is an? {kind} tensor"):
        fn()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.int64])
def test_a_float8_divisor_is_a_type_error_naming_it(input_dtype):
    # It failed with a KeyError from the promotion table (a float input) or named `input`.
    other = torch.rand(3).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="`other` has dtype torch.float8_e4m3fn"):
        gradguard.safe_div(torch.ones(3, dtype=input_dtype), other)


# ---- a Python-number divisor: a fill on the device, not a copy ------------------------------------

def test_number_divisor_is_filled_on_the_device_not_copied():
    x = torch.randn(7, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        got = gradguard.safe_div(x, 3.0)
    names = [e.name for e in prof.events()]
    assert "aten::lift_fresh" not in names  # what torch.tensor(number) records (a host-to-device copy on CUDA)
    assert "aten::fill_" in names
    assert torch.equal(got, x / 3.0)


@needs_cuda
@pytest.mark.parametrize("path", ["api", "op", "ref"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_zero_dim_cpu_input_with_cuda_other_matches_torch_div(path, dtype):
    a = torch.tensor(3.0, dtype=dtype)
    b = torch.tensor([0.5, -2.0, 0.0, 4.0], dtype=dtype, device="cuda")
    fn = {"api": lambda u, v: gradguard.safe_div(u, v), "op": lambda u, v: ops.safe_div(u, v, 0.0, 0.0),
          "ref": lambda u, v: ref.safe_div(u, v, 0.0, 0.0)}[path]
    got = fn(a, b)
    want = torch.where(b == 0, torch.zeros((), dtype=dtype, device="cuda"), torch.div(a, b))
    assert got.device == want.device
    assert torch.equal(bits(got), bits(want))
    got_s = fn(b, torch.tensor(2.0, dtype=dtype))  # 0-dim CPU other too
    assert got_s.device.type == "cuda" and torch.equal(bits(got_s), bits(torch.div(b, torch.tensor(2.0, dtype=dtype))))
    both = fn(torch.tensor(3.0, dtype=dtype), torch.tensor(2.0, dtype=dtype, device="cuda"))
    assert both.device.type == "cuda" and both.item() == 1.5


@needs_cuda
def test_cuda_zero_dim_cpu_input_backward_matches_torch_div():
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -2.0, 4.0], dtype=torch.float64, device="cuda", requires_grad=True)
    gradguard.safe_div(a, b).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    torch.div(a2, b2).sum().backward()
    assert a.grad.device == a2.grad.device
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-12, atol=0)


@needs_cuda
def test_cuda_number_divisor_makes_no_host_to_device_copy():
    x = torch.randn(1 << 12, device="cuda")
    gradguard.safe_div(x, 3.0)  # warm-up: allocator, module loading
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        got = gradguard.safe_div(x, 3.0)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "memcpy" in e.name.lower() and "htod" in e.name.lower()]
    assert not copies, copies
    torch.testing.assert_close(got.double(), x.double() / 3.0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("call", [
    lambda x, out: gradguard.safe_log(x, out=out), lambda x, out: gradguard.safe_exp(x, out=out),
    lambda x, out: gradguard.safe_sqrt(x, out=out), lambda x, out: gradguard.safe_div(x, x, out=out),
    lambda x, out: gradguard.safe_div(x.half(), 0.1, out=out)], ids=["log", "exp", "sqrt", "div", "div_half_number"])
def test_a_refused_out_is_left_as_it_was(call):
    """An `out` of the wrong dtype and shape: refused before it is resized (it used to be
    resized, with a warning, and then refused)."""
    out = torch.zeros(5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resize warning either
        with pytest.raises(RuntimeError, match=r"`out` has dtype torch.float64 but the result has dtype"):
            call(torch.rand(2, 3) + 0.1, out)
    assert out.shape == (5,) and not out.any()


@pytest.mark.parametrize("call, arg", [(lambda x: gradguard.safe_log(x, eps=10 ** 400), "eps"),
                                       (lambda x: gradguard.safe_exp(x, max=-10 ** 400), "max"),
                                       (lambda x: gradguard.safe_div(x, x, fill=10 ** 400), "fill"),
                                       (lambda x: gradguard.safe_div(x, 10 ** 400), "other")])
def test_an_integer_beyond_float64_is_refused_naming_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"`{arg}` is an integer of 401 digits, beyond float64's range"):
        call(torch.rand(3) + 0.1)


@pytest.mark.parametrize("op", ["safe_log", "safe_exp", "safe_sqrt", "safe_div"])
def test_an_out_that_partly_overlaps_the_input_is_refused_on_every_path(op):
    # torch refuses it (TensorIterator); the compiled kernel did too, the pure-PyTorch path wrote
    # through the overlap without a word.
    x = torch.arange(1.0, 11.0)
    call = getattr(gradguard, op)
    args = (x[:6], 2.0) if op == "safe_div" else (x[:6],)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        call(*args, out=x[2:8])
    assert torch.equal(x, torch.arange(1.0, 11.0))
    y = torch.arange(1.0, 7.0)
    call(*((y, 2.0) if op == "safe_div" else (y,)), out=y)  # exactly the input: in place, allowed
    z = torch.arange(1.0, 11.0)
    call(*((z[:5], 2.0) if op == "safe_div" else (z[:5],)), out=z[5:])  # disjoint: allowed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_division_by_a_number_checks_out_against_the_callers_operands(dtype):
    # float16/bfloat16 divided by a number runs in float32 on a copy of the input; `out` was
    # checked against that copy, so an `out` that is a view of the input (needing a resize, or
    # partly overlapping it) was accepted and written over the input.
    a = torch.arange(1.0, 7.0, dtype=dtype).view(2, 3)
    before = a.clone()
    with pytest.raises(RuntimeError, match="also an operand"):
        gradguard.safe_div(a, 2.0, out=a[0])
    x = torch.arange(1.0, 11.0, dtype=dtype)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        gradguard.safe_div(x[:6], 2.0, out=x[2:8])
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        gradguard.safe_div(x[:6], torch.tensor(2.0, dtype=torch.float64), out=x[2:8])
    assert torch.equal(a, before) and torch.equal(x, torch.arange(1.0, 11.0, dtype=dtype))
    gradguard.safe_div(a, 2.0, out=a)  # exactly the input: in place, allowed
    assert torch.equal(a, before / 2)


@pytest.mark.parametrize("path", ["api", "ref"])
def test_a_shape_mismatch_names_the_operands_as_torch_div_does(path):
    call = gradguard.safe_div if path == "api" else (lambda a, b: ref.safe_div(a, b, 0.0, 0.0))
    with pytest.raises(RuntimeError, match=r"size of tensor a \(4\) must match the size of tensor b \(3\)"):
        call(torch.ones(4), torch.ones(3))


def test_an_out_overlapping_an_input_that_is_converted_is_refused():
    # An integer input (or one widened by a wider divisor) is divided as a converted copy: the
    # op's own overlap check saw the copy, and an out partly over the input was accepted.
    buf = torch.arange(1, 11, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        gradguard.safe_div(buf[:6], 2.0, out=buf.view(torch.float32)[2:8])
    assert torch.equal(buf, torch.arange(1, 11, dtype=torch.int32))
    f = torch.arange(1.0, 13.0)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        gradguard.safe_div(f[6:], torch.full((6,), 2.0, dtype=torch.float64), out=f.view(torch.float64))
    assert torch.equal(f, torch.arange(1.0, 13.0))


# ---- the backward ops' eps ------------------------------------------------------------------------

@pytest.mark.parametrize("value, error, msg", [(math.inf, ValueError, "must be finite"),
                                               (math.nan, RuntimeError, "must not be NaN"),
                                               (-1.0, RuntimeError, "must be >= 0")])
@pytest.mark.parametrize("path", ["op", "ref", "fake"])
@pytest.mark.parametrize("op", ["safe_log_backward", "safe_sqrt_backward"])
def test_the_backward_ops_check_their_eps(op, path, value, error, msg):
    # Called directly, safe_log_backward/safe_sqrt_backward took any eps (inf: zeros everywhere);
    # their forwards refused it. safe_div_backward checked it already.
    x = torch.rand(4) + 0.5
    if path == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            x = mode.from_tensor(x)
    fn = getattr(ref if path == "ref" else ops, op)
    args = (x, x, value, False) if op == "safe_log_backward" else (x, x, value)
    with pytest.raises(error, match=f"`eps` {msg}"):
        fn(*args)


@pytest.mark.parametrize("value, msg", [(math.nan, "`eps` must not be NaN"), (-1.0, "`eps` must be >= 0")])
@pytest.mark.parametrize("path", ["op", "ref"])
@pytest.mark.parametrize("op", ["safe_log", "safe_sqrt", "safe_div", "safe_div_backward"])
def test_the_ops_called_directly_refuse_a_nan_or_negative_eps_on_both_kernels(op, path, value, msg):
    # The reference kernels took them (safe_log(eps=-1) gave log(x), safe_div_backward any eps)
    # where the compiled ones refused: the two kernels of one op disagreed. (The public
    # functions check before, with errors of their own.) safe_exp's `max` may be negative.
    x = torch.rand(4) + 0.5
    fn = getattr(ref if path == "ref" else ops, op)
    args = {"safe_log": (x, value, False), "safe_sqrt": (x, value), "safe_div": (x, x, value, 0.0),
            "safe_div_backward": (x, x, x, value)}[op]
    with pytest.raises(RuntimeError, match=msg):
        fn(*args)
    if op == "safe_log":
        torch.testing.assert_close(getattr(ref if path == "ref" else ops, "safe_exp")(x, -1.0, False),
                                   torch.full((4,), math.exp(-1.0)))

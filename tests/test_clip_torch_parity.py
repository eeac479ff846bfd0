"""gradguard's clip API against PyTorch's own clip tests (the assertions of test_nn.py's
test_clip_grad_norm and test_clip_grad_norm_error_if_nonfinite, rewritten here), and the split
API (get_total_norm, clip_grads_with_norm_) against torch's.

Two documented differences are not asserted away but left out: torch scales non-finite grads by
the non-finite norm (gradguard leaves them untouched, tested in test_clip.py), and the rows of
torch's error table where its own norm of 2e200 overflows (gradguard's norm fix is tested with
the norm kernels)."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import gradguard

INF, NAN = math.inf, math.nan
NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]
FOREACH = [None, False, True]


def norm64(tensors, p):
    """float64 reference: torch's definition, the p-norm of the per-tensor p-norms (for p != 0 the
    norm of all elements together; for p = 0 the number of tensors that hold a nonzero)."""
    norms = torch.stack([torch.linalg.vector_norm(t.detach().double(), float(p)) for t in tensors])
    return torch.linalg.vector_norm(norms, float(p))


def linear_with_grads(grads):
    layer = torch.nn.Linear(10, 10)
    for p, g in zip(layer.parameters(), grads):
        p.grad = g.clone().view_as(p)
    return layer


def scale_of(layer, grads):
    """The factor each element was multiplied by; the clip must use one factor for all."""
    scale = torch.cat([p.grad.div(g).view(-1) for p, g in zip(layer.parameters(), grads)])
    torch.testing.assert_close(scale.std(), torch.tensor(0.0), atol=1e-5, rtol=0)
    return scale[0]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_large_grads_are_clipped_to_max_norm(norm_type, foreach):
    max_norm = 2
    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)
    layer = linear_with_grads(grads)
    before = norm64([p.grad for p in layer.parameters()], norm_type)
    norm = gradguard.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    after = norm64([p.grad for p in layer.parameters()], norm_type)
    torch.testing.assert_close(norm.double(), before, rtol=1e-6, atol=0)
    torch.testing.assert_close(after, torch.tensor(float(max_norm), dtype=torch.float64), rtol=1e-5, atol=0)
    assert after <= before
    scale_of(layer, grads)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_small_grads_are_left_unchanged(norm_type, foreach):
    max_norm = 2
    g = torch.Generator().manual_seed(0)
    grads = torch.rand(10, 10, generator=g).div(10000), torch.ones(10).div(500)
    layer = linear_with_grads(grads)
    before = norm64([p.grad for p in layer.parameters()], norm_type)
    norm = gradguard.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    after = norm64([p.grad for p in layer.parameters()], norm_type)
    torch.testing.assert_close(norm.double(), before, rtol=1e-6, atol=0)
    assert torch.equal(before, after) and after <= max_norm
    assert scale_of(layer, grads) == 1


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_single_tensor_equals_a_one_tensor_list(norm_type, foreach):
    g = torch.arange(1.0, 101).view(10, 10)
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    p1.grad, p2.grad = g.clone(), g.clone()
    gradguard.clip_grad_norm_(p1, 2, norm_type=norm_type, foreach=foreach)
    gradguard.clip_grad_norm_([p2], 2, norm_type=norm_type, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)
    torch.testing.assert_close(norm64([p1.grad], norm_type), torch.tensor(2.0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_exhausted_generator_warns_as_torch_does():
    layer = torch.nn.Linear(3, 3)
    params = layer.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gradguard.clip_grad_norm_(params, 1.0)
    assert len(w) == 1
    assert str(w[0].message) == "`parameters` is an empty generator, no gradient clipping will occur."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradguard.clip_grad_norm_([], 1.0)  # an empty list is deliberate: no warning


# ---- error_if_nonfinite: the table of torch's test (the 2e200 rows left out, see above) ---------

NORMS_POS = [0.1, 1, 2, 3.5, INF]
NORMS_NEG = [-0.1, -1, -2, -3.5]
NORMS_EXCEPT_0 = NORMS_POS + NORMS_NEG
NORMS_ALL = NORMS_EXCEPT_0 + [0]

# (only one element holds the scalar, a finite grad of 1 comes first, scalars, orders whose total
# norm is non-finite, orders whose total norm is finite)
CASES = [
    (False, False, [INF, -INF], NORMS_EXCEPT_0, [0]),
    (False, True, [INF, -INF], NORMS_POS, NORMS_NEG + [0]),
    (True, False, [INF, -INF], NORMS_POS, NORMS_NEG + [0]),
    (True, True, [INF, -INF], NORMS_POS, NORMS_NEG + [0]),
    (False, False, [NAN], NORMS_EXCEPT_0, [0]),
    (False, True, [NAN], NORMS_EXCEPT_0, [0]),
    (True, False, [NAN], NORMS_EXCEPT_0, [0]),
    (True, True, [NAN], NORMS_EXCEPT_0, [0]),
    (False, False, [2e22, -2e22], [], NORMS_ALL),
    (False, True, [2e22, -2e22], [], NORMS_ALL),
    (True, False, [2e22, -2e22], [], NORMS_ALL),
    (True, True, [2e22, -2e22], [], NORMS_ALL),
]


def gen_parameters(scalar, one_elem, prefix):
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    (param[1] if one_elem else param).mul(scalar).sum().backward()
    if not prefix:
        return [param]
    first = torch.ones(1, dtype=torch.float64, requires_grad=True)
    first.mul(1).sum().backward()
    return [first, param]


def run_case(norm_type, error_if_nonfinite, scalar, one_elem, prefix, nonfinite_norm, foreach):
    params = gen_parameters(scalar, one_elem, prefix)
    if nonfinite_norm and error_if_nonfinite:
        before = [p.grad.clone() for p in params]
        with pytest.raises(RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"):
            gradguard.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True, foreach=foreach)
        for p, b in zip(params, before):  # nothing written when it raises
            assert torch.equal(p.grad, b) or torch.equal(p.grad.isnan(), b.isnan())
    else:
        gradguard.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                                  foreach=foreach)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_error_if_nonfinite_raises_exactly_where_torch_does(case, foreach):
    one_elem, prefix, scalars, nonfinite_norms, finite_norms = CASES[case]
    for error_if_nonfinite in (False, True):
        for norm_type, scalar in itertools.product(nonfinite_norms, scalars):
            run_case(norm_type, error_if_nonfinite, scalar, one_elem, prefix, True, foreach)
        for norm_type, scalar in itertools.product(finite_norms, scalars):
            run_case(norm_type, error_if_nonfinite, scalar, one_elem, prefix, False, foreach)


def test_error_message_is_torchs_then_names_the_parameters():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    model.bias.grad[0] = INF
    with pytest.raises(gradguard.NonFiniteGradError) as info:
        gradguard.clip_grad_norm_(model.named_parameters(), 1.0, error_if_nonfinite=True)
    msg = str(info.value)
    assert msg.startswith("The total norm of order 2.0 for gradients from `parameters` is non-finite, so it "
                          "cannot be clipped.")
    assert "bias (0 NaN, 1 Inf)" in msg and info.value.names == ["bias"]
    assert isinstance(info.value, RuntimeError)


# ---- norm orders, norm_type forms and the returned dtype, against torch and float64 ------------

def grads_of(dtype, seed=0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(dtype) for s in [(13, 7), (5,), (3, 4, 2), ()]]
    if zeros:
        out[0][2, 3] = 0.0
    return out


@pytest.mark.parametrize("norm_type", [0, -1, -2.5, -INF, "-inf", 0.5, 3, "inf", INF])
@pytest.mark.parametrize("zeros", [False, True])
def test_every_torch_norm_order_matches_float64(norm_type, zeros):
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(torch.float32, zeros=zeros)]
    for p, g in zip(ours, grads_of(torch.float32, zeros=zeros)):
        p.grad = g
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(torch.float32, zeros=zeros)]
    for p, g in zip(theirs, grads_of(torch.float32, zeros=zeros)):
        p.grad = g
    want = norm64(grads_of(torch.float32, zeros=zeros), norm_type)
    got = gradguard.clip_grad_norm_(ours, 0.25, norm_type=norm_type)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 0.25, norm_type=norm_type)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert got.dtype == ref.dtype
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("as_tensor", [torch.tensor(2.0), torch.tensor([3.0]), torch.tensor(INF),
                                       torch.tensor(2, dtype=torch.int64)])
def test_tensor_norm_type(as_tensor):
    grads = grads_of(torch.float64)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    got = gradguard.clip_grad_norm_(params, 1e9, norm_type=as_tensor)
    torch.testing.assert_close(got, norm64(grads, float(as_tensor)), rtol=1e-12, atol=0)
    torch.testing.assert_close(gradguard.get_total_norm(grads, as_tensor), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtypes", [(torch.float16,), (torch.bfloat16,), (torch.float16, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_returned_norm_has_torchs_dtype(dtypes):
    grads = [g for i, d in enumerate(dtypes) for g in grads_of(d, seed=i)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    want = torch.nn.utils.get_total_norm(grads)
    got = gradguard.clip_grad_norm_(params, 0.1)
    assert got.dtype == want.dtype
    # float16/bfloat16: within one rounding of the float64 norm; wider types: the kernels' bound.
    rtol = torch.finfo(want.dtype).eps if want.dtype.itemsize == 2 else 1e-6
    torch.testing.assert_close(got.double(), norm64(grads, 2), rtol=rtol, atol=0)
    assert gradguard.get_total_norm(grads).dtype == want.dtype


def test_half_grads_are_clipped_by_their_true_norm_beyond_float16_range():
    grads = [torch.full((64,), 10000.0, dtype=torch.float16)]  # norm 80000 > float16 max
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float16))
    p.grad = grads[0].clone()
    got = gradguard.clip_grad_norm_([p], 1.0)
    assert got.dtype == torch.float16 and got.item() == INF  # what torch returns too
    torch.testing.assert_close(norm64([p.grad], 2), torch.tensor(1.0, dtype=torch.float64), rtol=2e-3, atol=0)


# ---- the split API ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf", 0, -2.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_get_total_norm_matches_torch_and_float64(dtype, norm_type):
    grads = grads_of(dtype)
    got = gradguard.get_total_norm(grads, norm_type)
    want = torch.nn.utils.get_total_norm(grads, norm_type)
    assert got.dtype == want.dtype and got.shape == want.shape == ()
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), norm64(grads, norm_type), rtol=rtol, atol=0)
    torch.testing.assert_close(gradguard.get_total_norm(grads[0], norm_type), torch.nn.utils.get_total_norm(
        grads[0], norm_type), rtol=rtol, atol=0)
    assert gradguard.get_total_norm([]).item() == 0.0


def test_get_total_norm_error_if_nonfinite():
    grads = grads_of(torch.float32)
    grads[1][0] = NAN
    assert math.isnan(gradguard.get_total_norm(grads).item())
    with pytest.raises(RuntimeError, match=r"The total norm of order 2.0 for gradients .*tensors\[1\] \(1 NaN"):
        gradguard.get_total_norm(grads, error_if_nonfinite=True)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_clip_grads_with_norm_matches_torch(dtype, max_norm):
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(dtype)]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(dtype)]
    for a, b, g in zip(ours, theirs, grads_of(dtype)):
        a.grad, b.grad = g.clone(), g.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in theirs])
    assert gradguard.clip_grads_with_norm_(ours, max_norm, total) is None
    torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, total)
    coef = min(max_norm / (norm64(grads_of(dtype), 2).item() + 1e-6), 1.0)
    for a, b, g in zip(ours, theirs, grads_of(dtype)):
        want = (g.double() * coef).to(dtype)
        tol = dict(rtol=0, atol=0) if max_norm > 1e3 else dict(rtol=1e-6 if dtype.itemsize >= 4 else 1e-2, atol=1e-7)
        torch.testing.assert_close(a.grad, want, **tol)
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_split_api_composes_to_clip_grad_norm_():
    a = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(torch.float32)]
    b = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(torch.float32)]
    for x, y, g in zip(a, b, grads_of(torch.float32)):
        x.grad, y.grad = g.clone(), g.clone()
    total = gradguard.get_total_norm([p.grad for p in a], 3.0)
    gradguard.clip_grads_with_norm_(a, 0.7, total)
    assert torch.equal(gradguard.clip_grad_norm_(b, 0.7, 3.0), total)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("total", [torch.tensor(NAN), torch.tensor(INF), INF])
def test_clip_grads_with_norm_leaves_grads_untouched_on_a_nonfinite_norm(total):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads_of(torch.float32)]
    for p, g in zip(params, grads_of(torch.float32)):
        p.grad = g.clone()
    gradguard.clip_grads_with_norm_(params, 1.0, total)
    for p, g in zip(params, grads_of(torch.float32)):
        assert torch.equal(p.grad, g)


def test_clip_grads_with_norm_bad_arguments_are_named():
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="total_norm"):
        gradguard.clip_grads_with_norm_(params, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="total_norm"):
        gradguard.clip_grads_with_norm_(params, 1.0, "big")
    with pytest.raises(ValueError, match="max_norm"):
        gradguard.clip_grads_with_norm_(params, -1.0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="foreach"):
        gradguard.clip_grads_with_norm_(params, 1.0, torch.tensor(1.0), foreach=1)
    with pytest.raises(ValueError, match="norm_type"):
        gradguard.get_total_norm([torch.ones(2)], "l2")


def _f16_overflowing():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p.grad = torch.tensor([60000.0, 60000.0], dtype=torch.float16)  # finite; the norm 84853 > 65504
    return [p]


@pytest.mark.parametrize("call", [
    lambda mod, ps: mod.get_total_norm([q.grad for q in ps], error_if_nonfinite=True),
    lambda mod, ps: mod.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)], ids=["get_total_norm", "clip_grad_norm_"])
def test_error_if_nonfinite_raises_on_a_norm_that_overflows_the_grads_dtype(call):
    """float16 grads whose norm overflows float16 (not float32): torch raises, since the norm it
    returns is inf; gradguard returned that inf without raising, and left the grads as they were."""
    with pytest.raises(RuntimeError, match="is non-finite"):
        call(torch.nn.utils, _f16_overflowing())
    ps = _f16_overflowing()
    with pytest.raises(gradguard.NonFiniteGradError, match=r"^The total norm of order 2.0 .* overflows float16"):
        call(gradguard, ps)
    assert ps[0].grad.tolist() == [60000.0, 60000.0]


@pytest.mark.parametrize("limit", [torch.tensor(1), torch.tensor([1], dtype=torch.int32)], ids=["int64", "int32"])
def test_an_integer_tensor_max_norm_clips_as_torch_does(limit):
    """torch takes an integer tensor limit; gradguard's check took it too, then its decision op
    refused it ("max_norm must be a one-element floating-point tensor")."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    torch.testing.assert_close(gradguard.clip_grad_norm_([a], limit), torch.nn.utils.clip_grad_norm_([b], limit))
    torch.testing.assert_close(a.grad, b.grad)
    opt = gradguard.GradGuard(torch.optim.SGD([a], lr=1.0), max_norm=limit)
    a.grad = torch.tensor([3.0, 4.0, 0.0])
    opt.step()
    torch.testing.assert_close(opt.last.clip_coef, torch.tensor(1.0 / (5.0 + 1e-6)))


@pytest.mark.parametrize("call", [
    lambda ps: gradguard.clip_grad_norm_(ps, None),
    lambda ps: gradguard.clip_grad_norm_(ps, 1.0, None),
    lambda ps: gradguard.clip_grad_norm_(ps, 1j),
    lambda ps: gradguard.clip_grad_norm_(ps, 1.0, 2j),
    lambda ps: gradguard.get_total_norm([p.grad for p in ps], None),
    lambda ps: gradguard.clip_grads_with_norm_(ps, None, torch.tensor(5.0)),
])
def test_an_argument_of_the_wrong_kind_is_a_type_error_as_in_torch(call):
    # torch raises TypeError for these; gradguard raised ValueError, which code written for torch
    # does not catch. ArgumentTypeError is both, so code catching the old ValueError still works.
    ps = [torch.nn.Parameter(torch.zeros(2))]
    ps[0].grad = torch.tensor([3.0, 4.0])
    torch_ps = [torch.nn.Parameter(torch.zeros(2))]
    torch_ps[0].grad = torch.tensor([3.0, 4.0])
    with pytest.raises(TypeError):
        eval_with_torch(call, torch_ps)
    with pytest.raises(gradguard.ArgumentTypeError) as info:
        call(ps)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert torch.equal(ps[0].grad, torch.tensor([3.0, 4.0]))


def eval_with_torch(call, ps):
    # The same call with torch's functions in gradguard's place.
    import types
    fake = types.SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
                                 get_total_norm=torch.nn.utils.get_total_norm,
                                 clip_grads_with_norm_=torch.nn.utils.clip_grads_with_norm_)
    return types.FunctionType(call.__code__, {**call.__globals__, "gradguard": fake})(ps)


def test_an_integer_total_norm_or_max_norm_clips_as_in_torch():
    ours, theirs = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    ours.grad, theirs.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    gradguard.clip_grads_with_norm_([ours], 1.0, torch.tensor(5))
    torch.nn.utils.clip_grads_with_norm_([theirs], 1.0, torch.tensor(5))
    torch.testing.assert_close(ours.grad, theirs.grad)
    with pytest.raises(TypeError, match="`total_norm` must be a real tensor"):
        gradguard.clip_grads_with_norm_([ours], 1.0, torch.tensor(True))
    for dtype in (torch.int8, torch.int16, torch.uint8):  # an integer max_norm tensor too (int32/int64 before)
        ours.grad, theirs.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
        got = gradguard.clip_grad_norm_([ours], torch.tensor(1, dtype=dtype))
        want = torch.nn.utils.clip_grad_norm_([theirs], torch.tensor(1, dtype=dtype))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ours.grad, theirs.grad)
    with pytest.raises(ValueError, match="`foreach`"):  # an ArgumentTypeError: a TypeError too
        gradguard.clip_grad_norm_([ours], 1.0, foreach="yes")

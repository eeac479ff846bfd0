"""gradguard.clip_grad_norm_: PyTorch's result on finite grads, and grads that survive NaN/Inf."""
from __future__ import annotations

import math

import pytest
import torch

import gradguard
from conftest import FLOAT_DTYPES

NAN, INF = math.nan, math.inf


def bits(t):
    """The raw bits of a float tensor, so NaN payloads and -0.0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_params(dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(30, 20), (20,), (7, 3, 5), (), (1,)]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_on_finite_grads(dtype, max_norm, norm_type):
    ours, theirs = make_params(dtype), make_params(dtype)
    got = gradguard.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=True)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=0)
    if max_norm > 1e3:  # no clipping: grads multiplied by exactly 1
        for a, b in zip(ours, make_params(dtype)):
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_torch_on_half_grads(dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    got = gradguard.clip_grad_norm_(ours, 0.3)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_skip_leaves_nonfinite_grads_bit_identical(dtype, value):
    params = make_params(dtype)
    params[0].grad[3, 4] = value
    before = [p.grad.clone() for p in params]
    total = gradguard.clip_grad_norm_(params, 0.1)
    assert math.isnan(total.item()) if math.isnan(value) else total.item() == INF
    for p, b in zip(params, before):
        assert torch.equal(bits(p.grad), bits(b))
    # PyTorch's clip, for contrast, destroys them (issue 46849).
    theirs = make_params(dtype)
    theirs[0].grad[3, 4] = value
    torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert not torch.isfinite(theirs[1].grad).all() or torch.count_nonzero(theirs[1].grad) == 0


def test_raise_names_the_offending_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()
    model[2].weight.grad[0, 0] = NAN
    model[0].bias.grad[1] = INF
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(gradguard.NonFiniteGradError) as info:
        gradguard.clip_grad_norm_(model.named_parameters(), 1.0, nonfinite="raise")
    err = info.value
    assert err.names == ["0.bias", "2.weight"]
    assert "0.bias (0 NaN, 1 Inf)" in str(err) and "2.weight (1 NaN, 0 Inf)" in str(err)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    with pytest.raises(gradguard.NonFiniteGradError, match=r"param\[1\] .*param\[2\] "):
        gradguard.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)


def test_raise_passes_finite_grads_through_and_clips():
    ours, theirs = make_params(), make_params()
    torch.testing.assert_close(gradguard.clip_grad_norm_(ours, 0.5, nonfinite="raise"),
                               torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_replaces_nonfinite_and_clips_the_rest_by_their_norm(dtype):
    params = make_params(dtype, scale=10.0)
    params[0].grad[0, 0] = NAN
    params[1].grad[5] = -INF
    params[2].grad[1, 1, 1] = INF
    expect = clone_params(params)
    for p in expect:
        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    want_total = torch.nn.utils.clip_grad_norm_(expect, 1.0)
    total = gradguard.clip_grad_norm_(params, 1.0, nonfinite="zero")
    assert math.isnan(total.item())  # the norm of the grads as they came in
    tol = dict(rtol=1e-6, atol=0) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-3)
    for a, b in zip(params, expect):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, **tol)
    new = gradguard.grad_stats([p.grad for p in params]).total_norm
    assert new.item() <= 1.0 + 1e-3 and want_total.item() > 1.0


def test_mixed_dtype_parameters_are_clipped_together():
    params = make_params(torch.float32) + make_params(torch.float64, seed=1)
    theirs = clone_params(params)
    got = gradguard.clip_grad_norm_(params, 0.7)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.7)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=0)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_params_without_grad_are_ignored_and_no_grads_give_zero():
    params = make_params()
    params[1].grad = None
    theirs = clone_params([p for p in params if p.grad is not None])
    torch.testing.assert_close(gradguard.clip_grad_norm_(params, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    assert gradguard.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0
    single = make_params()[0]
    ref = clone_params([single])[0]
    torch.testing.assert_close(gradguard.clip_grad_norm_(single, 0.5), torch.nn.utils.clip_grad_norm_(ref, 0.5))


@pytest.mark.parametrize("max_norm", [-1.0, NAN, "1", None])
def test_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        gradguard.clip_grad_norm_(make_params(), max_norm)


def test_bad_nonfinite_mode_and_norm_type():
    with pytest.raises(ValueError, match="nonfinite"):
        gradguard.clip_grad_norm_(make_params(), 1.0, nonfinite="ignore")
    for bad in (NAN, "two", None, True, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="norm_type"):
            gradguard.clip_grad_norm_(make_params(), 1.0, norm_type=bad)
    with pytest.raises(ValueError, match="foreach"):
        gradguard.clip_grad_norm_(make_params(), 1.0, foreach="yes")
    with pytest.raises(ValueError, match="norm_type"):
        gradguard.grad_stats([torch.ones(3)], norm_type=-2)  # grad_stats keeps p > 0
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str"):
        gradguard.clip_grad_norm_([make_params()[0], "w"], 1.0)


def test_max_norm_may_be_a_device_tensor():
    ours, theirs = make_params(), make_params()
    got = gradguard.clip_grad_norm_(ours, torch.tensor(0.5))
    torch.testing.assert_close(got, torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def scale_paths():
    from gradguard import reference

    paths = [("reference", reference.maybe_scale_)]
    if gradguard.backend()["cpu"] == "extension":
        paths.append(("dispatcher", torch.ops.gradguard.maybe_scale_))
    return paths


@pytest.mark.parametrize("path", [n for n, _ in scale_paths()])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_maybe_scale_multiplies_and_writes_nothing_for_one(path, dtype):
    fn = dict(scale_paths())[path]
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(300, generator=g).to(dtype), torch.randn(9, 7, generator=g).to(dtype).t(),
          torch.randn(50, generator=g).to(dtype)[::3], torch.tensor(1.5, dtype=dtype), torch.zeros(0, dtype=dtype)]
    ts[0][7] = NAN
    ts[0][8] = -INF
    before = [t.clone() for t in ts]
    fn(ts, torch.tensor(1.0))
    for t, b in zip(ts, before):
        assert torch.equal(bits(t), bits(b))
    fn(ts, torch.tensor(0.25))
    for t, b in zip(ts, before):
        torch.testing.assert_close(t, b * 0.25, rtol=0, atol=0, equal_nan=True)
    torch.library.opcheck(torch.ops.gradguard.maybe_scale_.default, ([t.clone() for t in ts], torch.tensor(0.5)))


def test_integer_grad_is_named_by_its_parameter():
    model = torch.nn.Linear(2, 2)
    model(torch.randn(3, 2)).sum().backward()
    model.bias.grad_dtype = None  # torch refuses a grad of another dtype unless told to allow it
    model.bias.grad = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"the gradient of bias has dtype torch.int64"):
        gradguard.clip_grad_norm_(model.named_parameters(), 1.0)


def test_a_float8_tensor_max_norm_is_a_limit_on_both_kernels():
    # torch takes it; the compiled decision op refused it in its own name (guard_decide), the
    # reference took it. Now read in float64 (exact) by both.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    got = gradguard.clip_grad_norm_([p], torch.tensor(1.0).to(torch.float8_e4m3fn))
    assert float(got) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", ["maybe_scale_", "zero_nonfinite_and_scale_"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_the_scaling_ops_name_a_sparse_layout(op, layout):
    # Sparse tensors reach the reference kernel, where torch's overlap check ("more than one
    # element ... refers to a single memory location") or is_contiguous refused them.
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    t = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    with pytest.raises(RuntimeError, match=rf"gradguard.{op}: tensors\[0\] is not a strided \(dense\) tensor"):
        getattr(torch.ops.gradguard, op)([t], torch.tensor(2.0))
    assert torch.equal(t.to_dense(), dense)

"""safe_log/safe_exp under CUDA autocast run in float32, as torch.log/torch.exp do there.

Without a GPU, CUDA autocast is emulated: a wrapper tensor that says it is on "cuda" (so the
dispatcher takes the AutocastCUDA kernels) and runs every op on the CPU tensor inside it. The
real GPU case, with gradients, runs below where a GPU exists.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._pytree import tree_map

import gradguard


class _OnCuda(torch.Tensor):
    """Says it is on cuda; every op runs on the CPU tensor it wraps."""

    @staticmethod
    def __new__(cls, inner, requires_grad=False):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device="cuda", requires_grad=requires_grad)

    def __init__(self, inner, requires_grad=False):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            if isinstance(t, _OnCuda):
                return t.inner
            return torch.device("cpu") if isinstance(t, torch.device) else t
        kwargs = tree_map(unwrap, kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        out = func(*tree_map(unwrap, args), **kwargs)
        return tree_map(lambda t: _OnCuda(t) if isinstance(t, torch.Tensor) else t, out)


@contextlib.contextmanager
def _cuda_autocast():
    # torch.autocast("cuda") turns itself off where CUDA is not available: set the state directly.
    was, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was)
        torch.set_autocast_dtype("cuda", dtype)


def _cpu(t):
    return t.inner if isinstance(t, _OnCuda) else t


CASES = [
    ("safe_log", lambda x: torch.log(torch.clamp(x, min=torch.finfo(x.dtype).tiny)),
     lambda: torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 8)),
    ("safe_exp", lambda x: torch.exp(torch.clamp(x, max=gradguard.safe_math.EXP_MAX[x.dtype])),
     lambda: torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 6),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name,composite,data", CASES, ids=[c[0] for c in CASES])
def test_safe_ops_under_cuda_autocast_compute_as_the_composite_does(name, composite, data, dtype):
    # safe_log(x16) stayed float16 under CUDA autocast, where torch.log gives float32: the
    # README's sigmoid example differed from its composite by up to 9e-4.
    op = getattr(gradguard, name)
    # (Forward only: autograd's engine needs a real CUDA device for a tensor on "cuda"; the
    # gradient is checked on a GPU below.)
    base = data().to(dtype)
    with _cuda_autocast():
        got, want = op(_OnCuda(base)), composite(_OnCuda(base))
    assert got.dtype == want.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert torch.equal(_cpu(got), _cpu(want))
    # Autocast off: the input's dtype, as before.
    assert op(_OnCuda(base)).dtype == dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,composite,data", CASES, ids=[c[0] for c in CASES])
def test_safe_ops_under_cuda_autocast_on_a_gpu(name, composite, data):
    x = data().half().cuda().requires_grad_()
    ref = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        got, want = getattr(gradguard, name)(x), composite(ref)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.linspace(-1, 1, x.numel(), device="cuda")
    (gx,), (gr,) = torch.autograd.grad(got, x, w), torch.autograd.grad(want, ref, w)
    assert gx.dtype == torch.float16
    torch.testing.assert_close(gx, gr, rtol=0, atol=0)


def test_safe_ops_under_cpu_autocast_keep_the_input_dtype_as_the_composite():
    # CPU autocast does not list log/exp: bfloat16 in, bfloat16 out, for both.
    x = torch.rand(64).add_(0.1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gradguard.safe_log(x).dtype == torch.log(x).dtype == torch.bfloat16
        assert gradguard.safe_exp(x).dtype == torch.exp(x).dtype == torch.bfloat16

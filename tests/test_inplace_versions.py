"""Every op that writes a tensor in place bumps its version counter, as torch's in-place and
out= ops do: autograd then refuses a backward that needs the overwritten values, and an inference
tensor is refused outside inference mode. The C++ kernels wrote through raw pointers
without it: backward ran on the overwritten values (silently wrong gradients) and the two
backends disagreed."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES  # the cuda case is marked: benchmarks/gpu_check.sh runs it

import gradguard


def _ones(t):
    return torch.ones(3, device=t.device)


WRITERS = {
    # a device scale on a GPU: the CUDA kernel writes whatever its value
    "zero_nonfinite_and_scale_": lambda t: torch.ops.gradguard.zero_nonfinite_and_scale_(
        [t], torch.tensor(0.5, device=t.device)),
    "maybe_scale_": lambda t: torch.ops.gradguard.maybe_scale_([t], torch.tensor(0.5, device=t.device)),
    "safe_log_out": lambda t: gradguard.safe_log(_ones(t), out=t),
    "safe_exp_out": lambda t: gradguard.safe_exp(_ones(t), out=t),
    "safe_sqrt_out": lambda t: gradguard.safe_sqrt(_ones(t), out=t),
    "safe_div_out": lambda t: gradguard.safe_div(_ones(t), 2.0 * _ones(t), out=t),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_version_counter_is_bumped(name, device):
    t = torch.tensor([1.0, 2.0, 3.0], device=device)
    before = t._version
    WRITERS[name](t)
    assert t._version > before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_backward_that_needs_the_overwritten_values_raises(name, device):
    x = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    y = x * 2
    z = (y * y).sum()  # saves y
    with torch.no_grad():
        WRITERS[name](y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_inference_tensor_is_refused_outside_inference_mode(name, device):
    # As torch's own in-place ops refuse it (which, like the fallback, write first; the C++
    # kernels refuse before writing).
    with torch.inference_mode():
        t = torch.tensor([1.0, 2.0, 3.0], device=device)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        WRITERS[name](t)


def test_clip_zero_mode_on_a_gradient_still_in_a_graph_raises_as_torchs_clip():
    # create_graph=True (a gradient penalty): the clip scales the gradient that the penalty's
    # backward needs; torch's clip_grad_norm_ makes that backward raise, and so must this one.
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    (g,) = torch.autograd.grad((w ** 3).sum(), w, create_graph=True)
    penalty = (g ** 2).sum()
    w.grad = g.detach()
    gradguard.clip_grad_norm_([w], 1.0, nonfinite="zero")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(penalty, w)

"""Helpers shared by the GradGuard tests: optimizer factories, snapshots, tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

from gradguard import GradGuard

# name -> factory(params). Covers every code path of the guard: fused (found_inf/grad_scale),
# foreach and for-loop (one host read), and the fused-SGD first-step trap.
OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    "sgd_momentum_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "sgd_momentum_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "adagrad_fused": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}

SHAPES = [(6, 5), (5,), (3, 4, 2)]


def make_params(seed: int = 0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def make_grads(step: int, shapes=SHAPES, scale: float = 1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def poison(grads):
    """A NaN in the first gradient and an Inf in the last."""
    bad = [g.clone() for g in grads]
    bad[0].view(-1)[1] = float("nan")
    bad[-1].view(-1)[0] = float("inf")
    return bad


def snapshot(params, opt):
    """Params and every optimizer state value, deep-copied."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_bit_identical(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y), "a parameter changed"
    assert sa.keys() == sb.keys(), f"optimizer state keys changed: {sorted(sa)} vs {sorted(sb)}"
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name, v in sa[k].items():
            w = sb[k][name]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), f"state[{k}][{name!r}] changed: {v} vs {w}"
            else:
                assert v == w, f"state[{k}][{name!r}] changed: {v} vs {w}"


class TinyNet(torch.nn.Module):
    def __init__(self, d_in=8, d_hidden=16, d_out=1):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture(params=["host", "device"])
def decide_on(request, monkeypatch):
    """Runs a test both ways a fused step can be decided: with the flag read on the host (what
    the CPU does) and on the device through found_inf/grad_scale (what every accelerator does)."""
    monkeypatch.setattr(GradGuard, "_decide_on_host_on_cpu", request.param == "host")
    return request.param

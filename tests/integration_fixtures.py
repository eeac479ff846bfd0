"""Tiny models, synthetic data and a NaN planted at a known step, shared by the integration tests
(Lightning, Hugging Face, TensorBoard). The float64 reference norm of the raw gradients is taken
where the NaN is planted, before anything else touches them."""
from __future__ import annotations

import math

import torch

CLIP_EPS = 1e-6  # PyTorch's (and the guard's) clip factor: min(max_norm / (norm + eps), 1)


def ref_total_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def ref_clip_coef(total: float, max_norm: float) -> float:
    return min(max_norm / (total + CLIP_EPS), 1.0) if math.isfinite(total) else 1.0


def regression_data(n: int = 64, features: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :1] * 3.0 + 0.1 * torch.randn(n, 1, generator=g))


def plant_nan(grad: torch.Tensor) -> None:
    grad.view(-1)[0] = float("nan")


def snapshot(module: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_identical(before: dict, module: torch.nn.Module) -> None:
    for n, p in module.named_parameters():
        assert torch.equal(before[n], p.detach()), f"{n} changed on a skipped step"


def optimizer_state_snapshot(opt: torch.optim.Optimizer) -> list:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in opt.state.values()]


def assert_state_identical(before: list, opt: torch.optim.Optimizer) -> None:
    after = list(opt.state.values())
    assert len(before) == len(after)
    for b, a in zip(before, after):
        for k in b:
            assert torch.equal(torch.as_tensor(b[k]), torch.as_tensor(a[k])), f"optimizer state {k!r} changed"

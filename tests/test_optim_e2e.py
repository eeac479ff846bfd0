"""End to end: a small real model trained through NaN batches, with and without the guard."""
from __future__ import annotations

import math

import pytest
import torch

from gradguard import GradGuard
from optim_util import decide_on  # noqa: F401

POISONED = {7, 19, 33}  # 0-based batch indices whose input holds a NaN


class SmallConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 8, kernel_size=5, padding=2)
        self.norm = torch.nn.LayerNorm(8 * 16)
        self.head = torch.nn.Linear(8 * 16, 2)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


def _data(i):
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(32, 16, generator=gen)
    y = (x[:, :8].sum(1) > x[:, 8:].sum(1)).long()  # which half of the signal is larger
    if i in POISONED:
        x[3, 5] = float("nan")
    return x, y


def _train(guarded: bool, fused: bool, steps: int = 60):
    torch.manual_seed(0)
    model = SmallConvNet()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused, foreach=None if fused else True)
    opt = GradGuard(inner, max_norm=1.0, model=model) if guarded else inner
    reports, losses = [], []
    if guarded:
        opt.add_step_hook(lambda guard, rep: reports.append(rep.as_dict()))
    for i in range(steps):
        x, y = _data(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, opt, reports, losses


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_guard_survives_nan_batches_and_names_them(fused, decide_on):
    bare, _, _, _ = _train(False, fused)
    assert any(torch.isnan(p).any() for p in bare.parameters())  # the unguarded run is destroyed

    model, opt, reports, losses = _train(True, fused)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    clean = [l for i, l in enumerate(losses) if i not in POISONED]
    assert sum(clean[-5:]) / 5 < 0.6 * sum(clean[:5]) / 5  # it learned

    skipped = {r["step"] - 1 for r in reports if r["skipped"]}
    assert skipped == POISONED
    for r in reports:
        if r["step"] - 1 in POISONED:
            assert "conv.weight" in r["nonfinite_layers"] and math.isnan(r["total_norm"])
        else:
            assert r["nonfinite_layers"] == [] and math.isfinite(r["total_norm"])
    s = opt.summary()
    assert s["steps"] == 60 and s["skipped"] == 3 and s["consecutive_skips"] == 0
    assert {w["nonfinite_steps"] for w in s["worst_layers"]} == {3}
    assert [i for i, sk in enumerate(opt.history.as_dict()["skipped"]) if sk] == sorted(POISONED)

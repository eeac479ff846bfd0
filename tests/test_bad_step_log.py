"""The integrations' log of steps not yet checked for NaN/Inf (gradguard/integrations/_common.py),
without any framework installed."""
from __future__ import annotations

import math

import torch

from gradguard import GradGuard
from gradguard.integrations._common import BadStepLog


def test_pending_reports_are_checked_before_they_pile_up():
    # A Trainer that never logs (logging_strategy="no") kept every step's report, with its
    # per-layer tensors: 20,000 steps of 100 layers held 116 MB. Now at most MAX_PENDING are kept,
    # and the bad steps found meanwhile still come back from the next flush.
    p = torch.nn.Parameter(torch.zeros(3))
    opt = GradGuard(torch.optim.SGD([p], lr=0.1), names=["w"], hygiene=False)
    log, bad = BadStepLog(), []
    steps = 2 * BadStepLog.MAX_PENDING + 10
    for step in range(steps):
        p.grad = torch.full((3,), math.nan if step % 700 == 5 else 1.0)
        opt.step()
        log.add(step, opt.last)
        assert len(log.pending) < BadStepLog.MAX_PENDING
        if step == steps - 20:
            bad += log.flush()[0]
    bad += log.flush()[0]
    want = [s for s in range(steps) if s % 700 == 5]
    assert [b["step"] for b in bad] == want and [b["step"] for b in log.bad_steps] == want
    assert all(b["layers"] == ["w"] and b["skipped"] for b in bad)
    assert log.flush() == ([], [])
    log.add(0, opt.last)
    log.discard_unreported()
    assert log.flush() == ([], []) and not log.pending

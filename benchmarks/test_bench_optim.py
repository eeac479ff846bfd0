"""pytest-benchmark cases for GradGuard steps vs the bare step and the PyTorch way (issue 5 bar).

`pytest benchmarks/test_bench_optim.py --benchmark-enable --benchmark-only` times them on the
GPT-2-small-shaped gradients; `python -m gradguard.bench --only optim` prints the same comparison
as ratios measured in one interleaved run, with the targets. Under `--benchmark-disable` (CI)
each case runs once on a 10M-parameter model and checks what the step did.
"""
from __future__ import annotations

import pytest
import torch

import gradguard
from bench_fixtures import benchmarking, gpt2_grads  # noqa: F401  (fixtures)
from gradguard.bench.optim_cases import OP_PATHS, _torch_skip_step, tables
from gradguard.bench.stats_cases import ShrinkingMaxNorm, _params_with


@pytest.mark.parametrize("impl", ["bare", "gradguard", "torch_clip_error_if_nonfinite", "torch_isfinite_skip"])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_adamw_step(benchmark, gpt2_grads, kind, impl):
    benchmark.group = f"AdamW({kind}=True) step"
    params = _params_with(gpt2_grads)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02)
    start = [p.detach().clone() for p in params[:3]]
    grads = [p.grad for p in params]
    inner = torch.optim.AdamW(params, lr=1e-3, **{kind: True})
    guard = gradguard.GradGuard(inner, max_norm=1.0, hygiene=False)
    limit = ShrinkingMaxNorm(0.5 * float(gradguard.grad_stats(grads).total_norm))  # every call clips

    def guarded():
        guard.max_norm = limit()
        guard.step()

    def torch_error_if_nonfinite():
        torch.nn.utils.clip_grad_norm_(params, limit(), error_if_nonfinite=True, foreach=True)
        inner.step()

    step = {"bare": inner.step, "gradguard": guarded, "torch_clip_error_if_nonfinite": torch_error_if_nonfinite,
            "torch_isfinite_skip": lambda: _torch_skip_step(params, grads, inner, limit())}[impl]
    benchmark(step)
    assert all(not torch.equal(a, p) for a, p in zip(start, params))  # it stepped
    if impl == "gradguard":
        assert float(guard.last.clip_coef) < 1.0 and not bool(guard.last.skipped)
        torch.testing.assert_close(guard.last.total_norm * guard.last.clip_coef,
                                   torch.tensor(limit.value), rtol=1e-4, atol=0)


def test_optim_tables_quick(benchmarking):
    if benchmarking:
        pytest.skip("a smoke test of `python -m gradguard.bench --only optim` for CI")
    out = tables(quick=True)
    # On the CPU: the op-count and host-time tables (issue 15), then the fused (clip, no clip)
    # and foreach step tables.
    assert len(out) == 5
    assert out[0].title.startswith("Ops GradGuard.step() dispatches") and "host time" in out[1].title
    counts, timed = out[0], out[1:]
    assert not counts.rows and len(counts.checks) == len(OP_PATHS) + 1  # counts only, no timings
    for t in timed:
        assert t.rows and all(r.ms > 0 for r in t.rows) and t.checks
        assert any(c.endswith(": met") or c.endswith(": NOT met") for c in t.checks)

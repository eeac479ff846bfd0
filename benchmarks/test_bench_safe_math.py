"""pytest-benchmark cases for safe_log / safe_exp vs the bare op, the eager composite and the
composite under torch.compile: forward (fresh output and out=) and forward+backward.

`pytest benchmarks/test_bench_safe_math.py --benchmark-enable --benchmark-only` times 2^26 float32
elements; `python -m gradguard.bench --only safe_math` prints the same cases as a table with the
issue's targets. With --benchmark-disable (CI) every case runs once on 2^16 elements and checks its
result, so a wrong fast kernel fails here; the compiled baseline is only run when benchmarking (a
compile per case would cost more than the rest of the suite).
"""
from __future__ import annotations

import pytest
import torch

import gradguard
from gradguard.bench.safe_math_cases import FULL_N, _exp_input, _log_input
from gradguard.safe_math import EXP_MAX

EPS = torch.finfo(torch.float32).tiny
MAX = EXP_MAX[torch.float32]
OPS = {
    "log": (_log_input, gradguard.safe_log, lambda x: torch.log(torch.clamp(x, min=EPS)), torch.log),
    "exp": (_exp_input, gradguard.safe_exp, lambda x: torch.exp(torch.clamp(x, max=MAX)), torch.exp),
}
_compiled: dict = {}


@pytest.fixture(scope="session")
def benchmarking(request) -> bool:
    # pytest-benchmark's own rule: --benchmark-enable overrides the --benchmark-disable in addopts.
    return not (request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def inputs(benchmarking):
    n = FULL_N if benchmarking else 1 << 16
    return {op: spec[0](n, "cpu") for op, spec in OPS.items()}


def _impl(op, impl, benchmarking):
    _, fused, composite, bare = OPS[op]
    if impl == "compiled":
        if not benchmarking:
            pytest.skip("the compiled baseline is timed only with --benchmark-enable")
        return _compiled.setdefault(op, torch.compile(composite))
    return {"bare": bare, "fused": fused, "eager": composite}[impl]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["bare", "fused", "eager", "compiled", "bare_out", "fused_out"])
def test_forward(benchmark, benchmarking, inputs, op, impl):
    benchmark.group = f"safe_{op} forward"
    x = inputs[op]
    composite = OPS[op][2]
    if impl.endswith("_out"):
        fn = _impl(op, impl[: -len("_out")], benchmarking)
        out = torch.empty_like(x)
        y = benchmark(lambda: fn(x, out=out))
        assert y.data_ptr() == out.data_ptr()
    else:
        y = benchmark(_impl(op, impl, benchmarking), x)
    want = composite(x)
    if impl.startswith("fused") or impl == "eager":
        assert torch.equal(y, want)
    else:  # bare: no clamp; compiled: inductor's own log/exp, within an ulp or so
        inside = (x >= EPS) if op == "log" else (x <= MAX)
        torch.testing.assert_close(y[inside], want[inside], rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["bare", "fused", "eager", "compiled"])
def test_forward_backward(benchmark, benchmarking, inputs, op, impl):
    benchmark.group = f"safe_{op} forward+backward"
    fn = _impl(op, impl, benchmarking)
    x = inputs[op].clone().requires_grad_(True)
    g = torch.ones_like(x)

    def run():
        x.grad = None
        fn(x).backward(g)

    benchmark(run)
    if impl in ("fused", "eager"):
        xc = inputs[op].clone().requires_grad_(True)
        OPS[op][2](xc).backward(g)
        assert torch.equal(x.grad, xc.grad)
    else:
        assert x.grad.shape == x.shape

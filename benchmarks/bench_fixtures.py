"""Benchmark fixtures (imported by the benchmark files; not a conftest.py, whose module name would
clash with tests/conftest.py): full GPT-2-small-shaped gradients when benchmarking, a small model when
pytest-benchmark is disabled (CI runs every benchmark once, as a plain test)."""
from __future__ import annotations

import pytest

from gradguard.bench.shapes import GPT2_SIZES, gpt2_shapes, make_grads


@pytest.fixture(scope="session")
def benchmarking(request) -> bool:
    return not request.config.getoption("benchmark_disable")


@pytest.fixture(scope="session")
def gpt2_grads(benchmarking):
    cfg = GPT2_SIZES["124M"] if benchmarking else GPT2_SIZES["10M"]
    return make_grads(gpt2_shapes(**cfg))

"""Shared test fixtures: the two kernel paths of every op, and device/dtype lists."""
from __future__ import annotations

import os

import pytest
import torch

import gradguard
from gradguard import reference

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
# The `device` fixture's params: every test taking `device` runs on the CPU and, marked `cuda`
# (benchmarks/gpu_check.sh selects them with -m cuda), on the GPU; without one that case is
# collected and reported as skipped rather than silently absent.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])]
EXT_LOADED = gradguard.backend()["extension_loaded"]

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded: "
                               + str(gradguard.backend()["reason"]))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: "cpu", then "cuda" (skipped without a GPU)."""
    return request.param


def stats_paths():
    """(name, callable) for each kernel of gradguard::multi_tensor_stats this process can run."""
    paths = [("reference", reference.multi_tensor_stats)]
    if EXT_LOADED:
        paths.append(("dispatcher", torch.ops.gradguard.multi_tensor_stats))
    return paths


def run_under_isa(code: str, isa: str) -> None:
    """Runs `code` in a subprocess with GRADGUARD_CPU_ISA=isa (the CPU kernels' copy for that ISA
    instead of the widest this CPU supports); it must print "ok"."""
    import subprocess
    import sys

    env = {**os.environ, "GRADGUARD_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def pytest_report_header(config):
    b = gradguard.backend()
    return [f"gradguard backend: cpu={b['cpu']} cuda={b['cuda']} reason={b['reason']}",
            f"GRADGUARD_DISABLE_EXT={os.environ.get('GRADGUARD_DISABLE_EXT', '')}"]

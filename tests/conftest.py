"""Shared test fixtures: the two kernel paths of every op, and device/dtype lists."""
from __future__ import annotations

import os

import pytest
import torch

import gradguard
from gradguard import reference

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXT_LOADED = gradguard.backend()["extension_loaded"]

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded: "
                               + str(gradguard.backend()["reason"]))


def stats_paths():
    """(name, callable) for each kernel of gradguard::multi_tensor_stats this process can run."""
    paths = [("reference", reference.multi_tensor_stats)]
    if EXT_LOADED:
        paths.append(("dispatcher", torch.ops.gradguard.multi_tensor_stats))
    return paths


def pytest_report_header(config):
    b = gradguard.backend()
    return [f"gradguard backend: cpu={b['cpu']} cuda={b['cuda']} reason={b['reason']}",
            f"GRADGUARD_DISABLE_EXT={os.environ.get('GRADGUARD_DISABLE_EXT', '')}"]

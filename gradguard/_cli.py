"""What the command-line tools (`python -m gradguard.bench`, `python -m gradguard.demo`) share."""
from __future__ import annotations

import argparse

import torch


def check_device_arg(ap: argparse.ArgumentParser, value: str, tool: str) -> None:
    """A `--device` value checked before anything runs, as an argparse error (exit status 2): a
    bad one failed after minutes of work, or as a traceback from inside a case."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        ap.error(f"--device: {value!r} is not a device ({e})")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device: {value!r}: the {tool} runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {value} needs a CUDA GPU, and torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")

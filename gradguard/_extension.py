"""Loading the compiled kernels, and saying why they are or are not there.

Two modules, built independently (see setup.py): gradguard._C (CPU kernels) and
gradguard._C_cuda (CUDA kernels). Each loads if its build record entry says it was built.

The build writes ``_build_info.json`` next to the package (torch version, CUDA, archs, or the
build error). It is checked before the shared library is imported, so a library built against
another torch fails with a sentence instead of an undefined-symbol error.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")

_MODULES = (("gradguard._C", "cpu"), ("gradguard._C_cuda", "cuda"))

_state: dict = {"loaded": False, "reason": None, "build": None, "modules": [], "partial": None}

_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An on/off environment switch: 1/true/yes/on is on, 0/false/no/off or unset/empty is off
    (case and surrounding blanks ignored). Anything else is an error: a typo must not silently
    pick a kernel path."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"gradguard: environment variable {name}={raw!r} is not a switch value; use one of "
                     f"1/true/yes/on to turn it on or 0/false/no/off (or unset it) to turn it off")


def _read_build_info():
    try:
        return json.loads(_BUILD_INFO_PATH.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable build record {_BUILD_INFO_PATH}: {exc}"}


def _try_load() -> str | None:
    """Imports the built kernel modules; returns None when at least one loaded, else the reason.
    A side that failed while the other loaded is left in _state["partial"]."""
    if env_switch("GRADGUARD_DISABLE_EXT"):
        return "disabled by GRADGUARD_DISABLE_EXT"
    build = _read_build_info()
    _state["build"] = build
    if build is None:
        return ("not built: no build record (gradguard/_build_info.json); install with "
                "`pip install --no-build-isolation .` in an environment that has torch and a C++ compiler")
    if build.get("error"):
        return f"not built: {build['error']}"
    built_torch = build.get("torch")
    if built_torch != torch.__version__:
        return (f"torch version mismatch: the extension was built against torch {built_torch} but "
                f"torch {torch.__version__} is installed; rebuild with `pip install --no-build-isolation .`")
    problems = []
    loaded = []
    for module, side in _MODULES:
        if not build.get(f"{side}_kernels", side == "cpu"):  # records from before the split: _C had both
            if build.get(f"{side}_error"):
                problems.append(f"{side.upper()} kernels not built: {build[f'{side}_error']}")
            continue
        try:
            importlib.import_module(module)
            loaded.append(module)
        except Exception as exc:  # any failure of the shared library: keep the package usable
            problems.append(f"{module} failed to load: {type(exc).__name__}: {exc}")
    _state["modules"] = loaded
    if not loaded:
        return "; ".join(problems) if problems else "not built: the build record lists no compiled kernels"
    _state["partial"] = "; ".join(problems) or None
    return None


def load() -> None:
    require = env_switch("GRADGUARD_REQUIRE_EXT")  # read first: a bad value fails before any loading
    reason = _try_load()
    _state["loaded"] = reason is None
    _state["reason"] = reason if reason is not None else _state["partial"]
    if _state["reason"] is not None and require:
        raise ImportError(f"gradguard: GRADGUARD_REQUIRE_EXT is set but the compiled extension is unavailable: {_state['reason']}")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def backend() -> dict:
    """Which kernels serve each device, and why the extension is missing if it is.

    Returns a dict: ``{"cpu": "extension" | "reference", "cuda": ..., "extension_loaded": bool,
    "reason": str | None, "build": dict | None, "modules": [...]}``. "reference" means the
    pure-PyTorch kernels; "reason" also names a side whose kernels failed to build or load while
    the other side's loaded; "modules" lists the compiled modules imported.
    """
    op = "gradguard::multi_tensor_stats"
    return {
        "cpu": "extension" if _state["loaded"] and _has_kernel(op, "CPU") else "reference",
        "cuda": "extension" if _state["loaded"] and _has_kernel(op, "CUDA") else "reference",
        "extension_loaded": _state["loaded"],
        "reason": _state["reason"],
        "build": _state["build"],
        "modules": list(_state["modules"]),
    }

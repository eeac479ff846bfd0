"""The integrations are optional: gradguard imports none of the frameworks, and a submodule
imported without its framework says what to install. Runs in the main suite, with or without
the framework packages."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest


def test_gradguard_imports_no_framework():
    code = ("import sys, gradguard, gradguard.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate', 'tensorboard') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("module, blocked, package", [
    ("gradguard.integrations.lightning", ["lightning", "lightning.pytorch"], "lightning"),
    ("gradguard.integrations.transformers", ["transformers"], "transformers"),
    ("gradguard.integrations.transformers", ["accelerate", "accelerate.optimizer"], "accelerate"),
])
def test_missing_framework_is_a_clear_import_error(monkeypatch, module, blocked, package):
    if package == "accelerate" and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: its own ImportError comes first")
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # what `import name` then raises: ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"needs the `{package}` package.*pip install {package}"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_tensorboard_hook_without_tensorboard(monkeypatch):
    from gradguard.integrations import tensorboard as tb

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tb.TensorBoardHook("/nonexistent/logdir")

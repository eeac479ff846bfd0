"""The README's integration examples (its "Framework integrations" section) run as written, with
the real frameworks, in a scratch directory."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.integrations


def _section_blocks() -> dict[str, str]:
    text = README.read_text()
    section = re.search(r"^## Framework integrations.*?(?=^## )", text, flags=re.S | re.M).group(0)
    blocks = {}
    for heading, body in re.findall(r"^### (\S+).*?```python\n(.*?)```", section, flags=re.S | re.M):
        blocks[heading] = body
    return blocks


def _run(name: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_section_blocks()[name], f"README.md {name} example", "exec"), namespace)  # noqa: S102
    return namespace


def test_readme_has_the_three_examples_and_the_diff():
    assert sorted(_section_blocks()) == ["Hugging", "Lightning", "TensorBoard"]
    assert "+trainer = pl.Trainer(max_epochs=2, callbacks=[GradGuardCallback(max_norm=1.0)])" in README.read_text()


def test_lightning_example(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    ns = _run("Lightning", tmp_path, monkeypatch)
    s = ns["guard_cb"].guard.summary()
    assert s["steps"] == 16 and s["skipped"] == 0
    assert ns["trainer"].logged_metrics["grad/total_norm"] > 0
    assert list(tmp_path.glob("logs/lightning_logs/version_0/metrics.csv"))


def test_hf_example(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ns = _run("Hugging", tmp_path, monkeypatch)
    last = ns["trainer"].state.log_history[-2]
    assert last["step"] == 8 and last["grad_norm"] == last["grad/total_norm"] and math.isfinite(last["grad_norm"])
    assert ns["guard_cb"].guard.summary()["steps"] == 8


def test_tensorboard_example(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    ns = _run("TensorBoard", tmp_path, monkeypatch)
    assert ns["opt"].summary()["steps"] == 20
    # Closed while the working directory is still tmp_path: the writer's flush thread resolves the
    # relative "runs/guard" later, and wrote (FileNotFoundError in a thread) against the repository.
    for hook in ns["opt"]._step_hooks.values():
        hook.writer.close()
    assert list(tmp_path.glob("runs/guard/events.out.tfevents.*"))

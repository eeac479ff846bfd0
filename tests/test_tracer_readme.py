"""The README's "Where did the NaN come from?" examples run as written and print what they say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks():
    text = README.read_text()
    section = text.split("## Where did the NaN come from?", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run(block):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md tracer example", "exec"), {})  # noqa: S102
    return out.getvalue().strip()


def test_always_mode_example_prints_its_comment():
    block = section_blocks()[0]
    expected = re.search(r"print\(origin\)\s+# (.*)", block).group(1)
    assert run(block) == expected


def test_on_failure_example_prints_its_comment():
    block = section_blocks()[1]
    expected = re.search(r"print\(origin\)\s+# (.*)", block).group(1)
    assert run(block) == expected

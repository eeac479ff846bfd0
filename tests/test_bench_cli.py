"""`python -m gradguard.bench`: runs, prints a table per case family, writes JSON and a PNG."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_quick_stats_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "gradguard.bench", "--quick", "--only", "stats",
                        "--json", str(out_json), "--plot", str(out_png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "read floor" in r.stdout and "gradguard.grad_stats" in r.stdout and "x floor" in r.stdout
    assert "measured gradguard.grad_stats" in r.stderr  # a progress line per case
    data = json.loads(out_json.read_text())
    titles = [t["title"] for t in data["tables"]]
    assert any(t.startswith("grad_stats,") for t in titles) and any(t.startswith("clip_grad_norm_") for t in titles)
    for t in data["tables"]:
        assert all(row["ms"] > 0 for row in t["rows"])
    assert any(c.startswith("grad_stats / ") and "(target <= " in c for t in data["tables"] for c in t["checks"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

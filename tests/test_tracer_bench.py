"""`python -m gradguard.bench --only tracer --quick`: registered, runs, and prints both models'
tables with the three targets and the detect_anomaly comparison."""
from __future__ import annotations

import subprocess
import sys


def test_tracer_bench_quick():
    r = subprocess.run([sys.executable, "-m", "gradguard.bench", "--quick", "--only", "tracer"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # The quick run's own sizes in the titles (they read "6-layer", "batch 4 x 64" whatever ran).
    for title in ("NanTracer, 2-layer transformer (", "batch 2 x 16 tokens", "NanTracer, ResNet-18, 32x32 (",
                  "batch 2)"):
        assert title in out
    assert out.count('"always" step / bare step (median of per-round ratios) = ') == 2
    assert out.count('"on_failure" step / bare step = ') == 2
    assert out.count("(detect_anomaly step / bare step = ") == 2

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


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gradguard.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_checks_its_arguments_before_running(tmp_path):
    # A missing --json folder failed after the whole run (FileNotFoundError); a bad --device as a
    # traceback, or (cuda on a CPU torch) an AssertionError from inside a case.
    for args, msg in ((["--json", str(tmp_path / "missing" / "b.json")], "--json: the folder"),
                      (["--plot", str(tmp_path / "missing" / "b.png")], "--plot: the folder"),
                      (["--device", "foo"], "--device: 'foo' is not a device"),
                      (["--device", "meta"], "the bench runs on cpu or cuda")):
        r = _bench("--quick", "--only", "tracer", *args)
        assert r.returncode == 2 and msg in r.stderr and "running" not in r.stdout, (args, r.stdout, r.stderr)
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        r = _bench("--quick", "--only", "tracer", "--device", "cuda")
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_bench_plot_without_a_floor_table_and_a_fixed_device_section(tmp_path):
    # The tracer's tables compare no floor: --plot crashed (a figure of 0 rows) after the run.
    # --device applies to the sections that run there; the tracer runs on the CPU (it raised).
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    r = _bench("--quick", "--only", "tracer", "--device", "cpu", "--json", str(out_json), "--plot", str(out_png),
               timeout=300)
    assert r.returncode == 0, r.stderr
    assert "not written" in r.stdout and not out_png.exists()
    data = json.loads(out_json.read_text())
    assert data["utc_start"] <= data["utc_end"] and data["utc_end"].endswith("Z")
    assert data["argv"][:3] == ["--quick", "--only", "tracer"]
    assert "commit" in data


def test_round_orders_vary_every_round_and_repeat_between_runs():
    # A rotation of one fixed order put every case after the same neighbour in every round.
    from gradguard.bench.timing import round_orders  # noqa: PLC0415

    names = list("abcdef")
    orders = round_orders(names, 40)
    assert orders == round_orders(names, 40) and all(sorted(o) == names for o in orders)
    before = {o[o.index("b") - 1] for o in orders if o.index("b") > 0}
    assert len(before) == 5  # "b" followed every other case in some round

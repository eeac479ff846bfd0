"""`python -m gradguard.demo`, shortened: the guarded run survives every fault, the unguarded one
dies, the report names what happened, and the picture is written."""
from __future__ import annotations

import subprocess
import sys


def test_demo_short_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gradguard.demo", "--steps", "60", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Result: guarded run ends finite; unguarded run shows the failure." in out
    # The NaN batch: the guard skipped the step and named layers; the unguarded params went NaN.
    assert "SKIPPED, non-finite grads in" in out and "embed.weight" in out
    assert "params NOT finite" in out
    # The forgotten zero_grad(): the hygiene warning names it.
    assert "hygiene warning from the guard: gradguard: step() was called twice with no zero_grad()" in out
    assert "Guard overhead per step:" in out
    # The tracer's run: each fault that makes a NaN/Inf is attributed to its true origin.
    lines = {line.split(" (")[0].strip(): line for line in out.split("Where did the NaN come from?")[1].splitlines()[1:]
             if line.startswith("  ")}
    assert "the input batch already held NaN (input [0]); 1 of 64 rows: batch rows [5]" in lines["nan_batch"]
    assert "the loss itself is NaN" in lines["exp_overflow"] and "first non-finite op: aten.exp" in lines["exp_overflow"]
    assert "the loss itself is Inf" in lines["log_zero"] and "first non-finite op: aten.log" in lines["log_zero"]
    for name in ("lr_spike", "no_zero_grad"):  # no NaN of their own, or one made later by the grown parameters
        assert "nothing for the tracer to trace: the origin is the update itself" in lines[name] or \
            "(after the fault: the grown parameters made it)" in lines[name]
    png = tmp_path / "gradguard_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_too_few_steps():
    r = subprocess.run([sys.executable, "-m", "gradguard.demo", "--steps", "5", "--no-plot"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--steps must be at least 50" in r.stderr


def test_every_fault_fits_in_the_shortest_run():
    # At --steps 20 (the old minimum) the 10 steps without zero_grad() were announced as steps
    # 16-25 of a 20-step run.
    from gradguard.demo import MIN_STEPS, fault_schedule

    for steps in range(MIN_STEPS, MIN_STEPS + 40):
        assert all(1 <= f.start and f.stop - 1 <= steps for f in fault_schedule(steps)), steps
    assert any(f.stop - 1 > 20 for f in fault_schedule(20))


def test_demo_checks_device_and_out_before_training(tmp_path):
    # Both failed as tracebacks, --out naming a file after all three runs (FileExistsError).
    f = tmp_path / "a_file"
    f.write_text("")
    for args, msg in ((["--device", "foo"], "--device: 'foo' is not a device"),
                      (["--out", str(f)], "is a file; give a folder")):
        r = subprocess.run([sys.executable, "-m", "gradguard.demo", "--steps", "50", *args], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Faults injected" not in r.stdout, (args, r.stderr)

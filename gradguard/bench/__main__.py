"""`python -m gradguard.bench`: every benchmark of the project, one table per case family.

Each row is a median over repeats, measured in the same run as its baselines and the bandwidth
floor; each table ends with its targets, met or not. Options: --quick (small sizes, few
repeats), --only NAME (a case module: stats, safe_math, optim, cuda, distributed,
integrations, tracer), --device, --json FILE,
--plot FILE (PNG bar chart of the ratios to the floor).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

import gradguard
from gradguard._cli import check_device_arg
from gradguard.bench import timing

# Sections whose cases exist on one device only: they run there whatever --device says (the tracer,
# the gloo process group and the framework runs are CPU benches; the cuda section is the GPU's).
FIXED_DEVICE = {"tracer": "cpu", "distributed": "cpu", "integrations": "cpu", "cuda": "cuda"}

CASE_MODULES = {
    "stats": "gradguard.bench.stats_cases",
    "safe_math": "gradguard.bench.safe_math_cases",
    "optim": "gradguard.bench.optim_cases",
    "cuda": "gradguard.bench.cuda_cases",
    "distributed": "gradguard.bench.distributed_cases",
    "integrations": "gradguard.bench.integrations_cases",
    "tracer": "gradguard.bench.tracer_cases",
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}"


def commit() -> str | None:
    """The source tree's git commit (with "+dirty" for uncommitted changes), when it is a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        top = subprocess.run(["git", "-C", here, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10)
        # An installed copy inside some other checkout (a venv in a project) is not that project.
        if top.returncode != 0 or not os.path.isfile(os.path.join(top.stdout.strip(), "gradguard", "bench",
                                                                  "__main__.py")):
            return None
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plot(tables, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("python -m gradguard.bench: --plot needs matplotlib (pip install 'gradguard[demo]' "
                         "or pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_floor = [t for t in tables if t.floor]
    if not with_floor:  # the tracer, distributed and integration tables compare no floor
        print(f"no table of this run has a floor or a baseline to divide by: {path} not written")
        return
    fig, axes = plt.subplots(len(with_floor), 1, figsize=(10, 2.2 + 0.45 * sum(len(t.rows) for t in with_floor)),
                             squeeze=False)
    for ax, t in zip(axes[:, 0], with_floor):
        floor = t.ms(t.floor)
        names = [r.name for r in t.rows][::-1]
        ratios = [r.ms / floor for r in t.rows][::-1]
        colors = ["tab:green" if n.startswith("gradguard") else "tab:gray" for n in names]
        ax.barh(names, ratios, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel(f"time / {t.floor} (lower is better)", fontsize=8)
        ax.set_title(t.title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradguard.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    ap.add_argument("--only", action="append", choices=sorted(CASE_MODULES), help="run only these case families")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu, plus cuda cases when a GPU is present)")
    ap.add_argument("--json", metavar="FILE", help="write every table as JSON")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of the ratios to the floor")
    args = ap.parse_args(argv)

    # Checked before anything runs: a bad device or output path failed only after the tables.
    if args.device is not None:
        check_device_arg(ap, args.device, "bench")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                ap.error(f"{flag}: the folder {folder} does not exist")
            if os.path.isdir(path) or not os.access(folder, os.W_OK):
                ap.error(f"{flag}: cannot write {path}")
    if "cuda" in (args.only or []) and not torch.cuda.is_available():
        # A GPU check that silently benchmarked nothing would read as a pass.
        ap.exit(2, "python -m gradguard.bench: error: --only cuda needs a CUDA GPU, and torch.cuda.is_available() "
                   f"is False (torch {torch.__version__}, CUDA build: {torch.version.cuda})\n")
    started = time.gmtime()
    timing.progress = True
    print(f"gradguard {gradguard.__version__} bench on {machine()}")
    print(f"backend: {json.dumps({k: v for k, v in gradguard.backend().items() if k != 'build'})}")
    # The distributed cases spawn their own process group, and the integration cases train real
    # Lightning/HF runs for minutes: only when asked for.
    names = args.only or [n for n in CASE_MODULES
                          if n not in ("distributed", "integrations") and (n != "cuda" or torch.cuda.is_available())]
    all_tables = []
    for name in names:
        mod = importlib.import_module(CASE_MODULES[name])
        device = FIXED_DEVICE.get(name, args.device or "cpu")
        if name == "cuda" and args.device is not None and torch.device(args.device).type == "cuda":
            device = args.device  # which GPU
        if args.device is not None and torch.device(args.device).type != torch.device(device).type:
            print(f"[{name}] runs on {device} only (--device {args.device} does not apply to it)", flush=True)
        t0 = time.perf_counter()
        print(f"[{name}] running on {device}{' (quick)' if args.quick else ''} ...", flush=True)
        tables = mod.tables(device=device, quick=args.quick)
        for t in tables:
            print()
            print(t.format(), flush=True)
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        all_tables += tables
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                       "utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", started),
                       "utc_end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
                       "argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "backend": {k: v for k, v in gradguard.backend().items() if k != "build"},
                       "tables": [t.as_dict() for t in all_tables]}, f, indent=1)
    if args.plot and all_tables:
        plot(all_tables, args.plot)
        print(f"wrote {args.plot}")
    # A target not met is a finding to report, not a crash: the exit status stays 0.
    missed = [c for t in all_tables for c in t.checks if "NOT met" in c]
    print(f"\n{len(missed)} target(s) not met" if missed else "\nall targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())

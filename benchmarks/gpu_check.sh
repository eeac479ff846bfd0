#!/usr/bin/env bash
# The GPU check: ONE command for a machine with a CUDA GPU, nvcc, and torch, ninja, pytest and
# pytest-benchmark already installed, and no package index (nothing is downloaded):
#   1. prints the torch / CUDA / nvcc versions and stops with one line if they do not match;
#   2. builds the CPU and CUDA kernels in place (setup.py build_ext --inplace: no pip), with
#      ninja on every core, for this GPU's architecture only;
#   3. stops with one line if no GPU is visible (everything above also runs without one);
#   4. runs tests/test_cuda.py, tests/test_cuda_graphs.py (a guarded step captured in a CUDA
#      graph), then every other test marked `cuda` (the `device` fixture's CUDA cases);
#   5. runs `python -m gradguard.bench --only cuda` and prints a one-screen table.
# Every step is time-boxed from one budget (TOTAL_CAP, default 540 s, inside one 600 s call: call
# it with a limit of about 590 s; the build's own cap is BUILD_CAP, default 260 s: a full sm_90
# build of this tree took ~150 s on 16 cores here, two extensions built one after the other);
# logs, bench.json and summary.txt go to $OUT (default ./out/gpu_check). Exit status: 0 when the
# build and all tests passed, 1 when something failed, 2 when the check could not run (versions,
# no GPU). A benchmark target that is not met is reported in the table, not as a failure.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir QUICK=1 PY=python3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PY:-python3}"
TOTAL_CAP="${TOTAL_CAP:-540}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
start=$(date +%s)
status=0
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }
stop() { echo "GPU CHECK STOPPED: $2" | tee -a "$OUT/summary.txt"; exit "$1"; }
# cap N: N seconds, or what is left of TOTAL_CAP if that is less (at least 1).
cap() { local left=$(( TOTAL_CAP - ($(date +%s) - start) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
: > "$OUT/summary.txt"

step "versions" | tee "$OUT/env.log"
if [ -z "${CUDA_HOME:-}" ]; then  # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
{
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  echo "cores: $(nproc)"
  "$NVCC" --version 2>&1 | tail -2 || echo "nvcc: not found (CUDA_HOME=$CUDA_HOME)"
} 2>&1 | tee -a "$OUT/env.log"
# One line per fact, then the verdict: a CPU-only torch, no nvcc, or another CUDA major version
# than nvcc's cannot build the kernels this check is for.
timeout 60 "$PY" - "$NVCC" <<'EOF' 2>&1 | tee -a "$OUT/env.log"
import re, subprocess, sys
import torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | torch CUDA {torch.version.cuda} | "
      f"GPU visible: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
try:
    out = subprocess.run([sys.argv[1], "--version"], capture_output=True, text=True, timeout=30).stdout
    nvcc = re.search(r"release (\d+)\.(\d+)", out).group(1, 2)
except Exception as exc:
    print(f"VERSION CHECK: nvcc not usable ({sys.argv[1]}: {exc})"); sys.exit(3)
if torch.version.cuda is None:
    print(f"VERSION CHECK: torch {torch.__version__} is a CPU-only build: no CUDA kernels to build"); sys.exit(3)
tc = tuple(torch.version.cuda.split(".")[:2])
if tc[0] != nvcc[0]:
    print(f"VERSION CHECK: torch was built with CUDA {'.'.join(tc)} but nvcc is {'.'.join(nvcc)}: "
          "a different major version cannot build against this torch"); sys.exit(3)
print(f"VERSION CHECK: ok (torch CUDA {'.'.join(tc)}, nvcc {'.'.join(nvcc)})"
      + ("" if tc == nvcc else "; minor versions differ, which torch accepts"))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || stop 2 "torch / nvcc versions do not fit (see $OUT/env.log)"

step "build (setup.py build_ext --inplace: ninja, no pip, no download)" | tee "$OUT/build.log"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Only this GPU's architecture: a third of the compile time of the default "8.0;9.0+PTX".
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)" \
    || stop 2 "no GPU to take the architecture from, and TORCH_CUDA_ARCH_LIST is not set"
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null || echo "warning: ninja not found; torch builds serially" | tee -a "$OUT/build.log"
b0=$(date +%s)
# GRADGUARD_BUILD_CUDA / GRADGUARD_REQUIRE_EXT only for the build: a kernel that fails to compile
# fails the check. The suite starts subprocesses with the extension disabled on purpose, which
# GRADGUARD_REQUIRE_EXT would turn into import errors.
GRADGUARD_BUILD_CUDA=1 GRADGUARD_REQUIRE_EXT=1 CFLAGS=-g0 timeout "$(cap "${BUILD_CAP:-260}")" "$PY" setup.py -q build_ext \
  --inplace >>"$OUT/build.log" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
  echo "built in $(( $(date +%s) - b0 ))s for arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS (CUDA_HOME=$CUDA_HOME)" | tee -a "$OUT/build.log"
else
  what=$([ "$rc" -eq 124 ] && echo "timed out" || echo "failed (exit $rc)")
  echo "BUILD $what after $(( $(date +%s) - b0 ))s; the end of $OUT/build.log:"; tail -40 "$OUT/build.log"
  stop 1 "the build $what (see $OUT/build.log)"
fi
timeout 60 "$PY" -c "
import gradguard, json, torch
b = gradguard.backend()
print(json.dumps(b, indent=1))
assert b['cpu'] == 'extension' and b['cuda'] == 'extension', 'the compiled kernels are not both registered: ' + str(b['reason'])
ops = ['multi_tensor_stats', 'guard_decide', 'maybe_scale_', 'zero_nonfinite_and_scale_', 'safe_log', 'safe_exp', 'safe_sqrt', 'safe_div']
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key('gradguard::' + op, 'CUDA')]
assert not missing, f'no CUDA kernel for {missing}'
" 2>&1 | tee -a "$OUT/build.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || stop 1 "the built kernels do not load or register (see $OUT/build.log)"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || stop 2 "no CUDA GPU visible (torch.cuda.is_available() is False): the build above is all this machine can check"

step "CUDA tests (tests/test_cuda.py)" | tee "$OUT/test_cuda.log"
timeout "$(cap 120)" "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$OUT/test_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "CUDA graphs: a whole guarded step captured and replayed (tests/test_cuda_graphs.py)" | tee "$OUT/test_graphs.log"
timeout "$(cap 60)" "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee -a "$OUT/test_graphs.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "every other test's CUDA case (-m cuda: the device fixture)" | tee "$OUT/test_device.log"
timeout "$(cap 90)" "$PY" -m pytest -q -rfE -p no:cacheprovider -m "cuda and not slow" --ignore=tests/test_cuda.py \
  --ignore=tests/test_cuda_graphs.py \
  tests 2>&1 | tee -a "$OUT/test_device.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1  # 5: no test selected

step "GPU benchmarks (python -m gradguard.bench --only cuda)" | tee "$OUT/bench.log"
quick=()
[ "${QUICK:-0}" = "1" ] && quick=(--quick)
timeout "$(cap 90)" "$PY" -m gradguard.bench --only cuda ${quick[@]+"${quick[@]}"} --json "$OUT/bench.json" 2>&1 \
  | tee -a "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "summary" | tee -a "$OUT/summary.txt"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, os, re, sys
out = sys.argv[1]
def last_line(name):
    try:
        lines = [l for l in open(os.path.join(out, name)).read().splitlines()
                 if re.search(r"passed|failed|error|no tests ran|deselected", l)]
        return lines[-1].strip() if lines else "(no result line: timed out?)"
    except OSError:
        return "(not run)"
print(f"{'tests/test_cuda.py':<22} {last_line('test_cuda.log')}")
print(f"{'tests/test_cuda_graphs':<22} {last_line('test_graphs.log')}")
print(f"{'-m cuda, other files':<22} {last_line('test_device.log')}")
try:
    bench = json.load(open(os.path.join(out, "bench.json")))
except (OSError, ValueError):
    print("benchmarks: no results (see bench.log)")
    sys.exit(0)
print(f"device: {bench.get('device')}, torch {bench.get('torch')}, {bench.get('date')}")
keep = ("read floor", "(copy bandwidth", "gradguard multi_tensor_stats", "  same, replayed", "gradguard.grad_stats",
        "_foreach_norm + _amp", "gradguard safe_", "torch.log (bare", "torch.exp (bare", "safe_", "torch.div",
        "gradguard.safe_div")
print(f"{'case':<58} {'ms':>8} {'GB/s':>7} {'/copy':>6}")
for t in bench["tables"]:
    print(t["title"][:100])
    copy = next((r["gbps"] for r in t["rows"] if r["name"].startswith("(copy bandwidth") and r["gbps"]), None)
    for r in t["rows"]:
        if r["name"].startswith(keep):
            ratio = f"{r['gbps'] / copy:6.2f}" if copy and r["gbps"] else ""
            print(f"  {r['name'][:56]:<56} {r['ms']:8.3f} {r['gbps'] or 0:7.0f} {ratio:>6}")
    for c in t["checks"]:
        print(f"  -> {c}")
EOF
echo "total $(( $(date +%s) - start ))s of a ${TOTAL_CAP}s budget; logs in $OUT; exit status $status" | tee -a "$OUT/summary.txt"
exit $status

#!/usr/bin/env bash
# The prepared GPU check of issue 4, for a machine with a CUDA GPU, nvcc, and torch, ninja,
# pytest and pytest-benchmark already installed (no package index needed):
#   1. builds the extension in place with the CUDA kernels for this GPU's architecture;
#   2. runs the CUDA tests, then the whole suite (CUDA parametrizations included);
#   3. runs the GPU benchmarks (gradguard.bench.cuda_cases) and prints one short table.
# Every step is time-boxed so the whole check ends inside 8 minutes; logs go to $OUT (default
# ./out/gpu_check). The exit status is non-zero if the build or any test failed; a benchmark
# target that is not met is reported in the table, not as a failure.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir QUICK=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
status=0
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "environment" | tee "$OUT/env.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
  nvcc --version | tail -2
  nproc
} 2>&1 | tee -a "$OUT/env.log"

step "build (pip install --no-build-isolation --no-deps -e .)" | tee "$OUT/build.log"
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
export CUDA_HOME
# Only this GPU's architecture: a third of the compile time of the default "8.0;9.0".
arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export GRADGUARD_BUILD_CUDA=1
b0=$(date +%s)
# GRADGUARD_REQUIRE_EXT only for the build: the suite starts subprocesses with the extension
# disabled on purpose, which that variable would turn into import errors.
if GRADGUARD_REQUIRE_EXT=1 CFLAGS=-g0 timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - b0 ))s for arch $TORCH_CUDA_ARCH_LIST (CUDA_HOME=$CUDA_HOME)" | tee -a "$OUT/build.log"
else
  echo "BUILD FAILED after $(( $(date +%s) - b0 ))s; the end of $OUT/build.log:"; tail -40 "$OUT/build.log"
  exit 1
fi
"$PY" -c "
import gradguard, json, torch
b = gradguard.backend()
print(json.dumps(b, indent=1))
assert b['cuda'] == 'extension', 'the CUDA kernels are not registered'
for op in ('multi_tensor_stats', 'maybe_scale_', 'zero_nonfinite_and_scale_'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('gradguard::' + op, 'CUDA'), op
" 2>&1 | tee -a "$OUT/build.log" || exit 1

step "CUDA tests (tests/test_cuda.py)" | tee "$OUT/test_cuda.log"
timeout 180 "$PY" -m pytest -q -rfEs tests/test_cuda.py -p no:cacheprovider 2>&1 | tee -a "$OUT/test_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "the whole suite on this machine (CUDA parametrizations included)" | tee "$OUT/test_all.log"
timeout 150 "$PY" -m pytest -q -rfE --ignore=tests/test_cuda.py -p no:cacheprovider -m "not slow" 2>&1 \
  | tee -a "$OUT/test_all.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1  # 5: no tests collected

step "GPU benchmarks (gradguard.bench.cuda_cases)" | tee "$OUT/bench.log"
quick=()
[ "${QUICK:-0}" = "1" ] && quick=(--quick)
timeout 150 "$PY" -m gradguard.bench.cuda_cases ${quick[@]+"${quick[@]}"} --json "$OUT/bench.json" 2>&1 | tee -a "$OUT/bench.log" || status=1

step "summary" | tee "$OUT/summary.txt"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, os, re, sys
out = sys.argv[1]
def last_line(name):
    try:
        lines = [l for l in open(os.path.join(out, name)).read().splitlines() if re.search(r"passed|failed|error|no tests ran", l)]
        return lines[-1].strip() if lines else "(no result line)"
    except OSError:
        return "(not run)"
print(f"{'tests/test_cuda.py':<24} {last_line('test_cuda.log')}")
print(f"{'whole suite':<24} {last_line('test_all.log')}")
try:
    bench = json.load(open(os.path.join(out, "bench.json")))
except OSError:
    print("benchmarks: no results (see bench.log)")
    sys.exit(0)
print(f"card: {bench['card']}, torch {bench['torch']}")
keep = ("read floor", "gradguard multi_tensor_stats", "  same, replayed", "_foreach_norm + _amp", "gradguard safe_", "torch.log (bare", "torch.exp (bare", "safe_")
print(f"{'case':<62} {'ms':>8} {'GB/s':>7}")
for t in bench["tables"]:
    print(t["title"])
    for r in t["rows"]:
        if r["name"].startswith(keep):
            print(f"  {r['name'][:60]:<60} {r['ms']:8.3f} {r['gbps'] or 0:7.0f}")
    for c in t["checks"]:
        print(f"  -> {c}")
EOF
echo "total $(( $(date +%s) - start ))s; logs in $OUT; exit status $status"
exit $status

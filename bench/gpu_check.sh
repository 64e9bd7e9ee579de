#!/usr/bin/env bash
# The GPU check of seft_ext, unattended and within a fixed time budget: builds the CUDA kernels,
# runs the op tests with CUDA, compute-sanitizer memcheck + racecheck on a tiny case, and the GPU
# benchmark. Written for one NVIDIA H200 (Python 3.12, torch 2.11.0+cu130, nvcc 13.0,
# compute-sanitizer, pytest, hypothesis; no internet); any CUDA machine with those will do.
#
#     bash bench/gpu_check.sh
#
# It ends by itself within GPU_CHECK_BUDGET_S (default 430 s) plus ~15 s. Results, in $OUT:
#     summary.md      stage / status / seconds / detail (also printed last on stdout)
#     build.log  diag.log  tests.log  sanitizer.log (memcheck + racecheck)  bench.log
#     bench_gpu.md    the benchmark tables (rewritten after every case, so partial if cut short)
#
# Stages, in order; expected times on an H200 in brackets (estimates):
#     build      SEFT_WITH_CUDA=ON SEFT_CUDA_ARCHS=9.0 pip install --no-build-isolation --no-deps -v .
#                (timed; then checks the installed build has the CUDA kernels)              [~1.5-3 min; 3.5 min on 2 cores]
#     diag       nvidia-smi, python -m seft_ext, compute-sanitizer --version                 [~5-10 s]
#     tests      SEFT_TEST_DEVICES=cuda python -m pytest tests/test_ops.py tests/test_tile_ptr.py
#                tests/test_bsr.py tests/test_cuda_evolve.py: the same op tests as on the CPU (CSR and
#                BSR), their CUDA cases (every
#                kernel path against dense fp64 math, tile edges, > 65535 blocks, int32 columns,
#                bitwise repeatability, no sync after a checked pattern, in-place pattern changes,
#                opcheck, gradcheck, torch.compile) and the evolution ops on CUDA. SEFT_TEST_DEVICES
#                makes CUDA that cannot be tested an error, not a skip; the CPU cases run in CI.
#                4 pytest workers when pytest-xdist is installed      [~1.5-2 min; ~2.5-3 min without xdist]
#     memcheck   compute-sanitizer --tool memcheck  on every op and path, 160x136 weight,
#                8 and 130 tokens (CSR; BSR in 4x4, 16x16, 32x16 blocks)                  [~20-60 s]
#     racecheck  compute-sanitizer --tool racecheck on the same                             [~20-60 s]
#                (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is its own allocation)
#     bench      python bench/bench_gpu.py --out $OUT/bench_gpu.md --budget-s <= 150         [~2.5 min]
# Each stage runs under `timeout` with a cap; all share one deadline. A stage also leaves time for
# the bench (its "reserve"), so when time is short the priority is build, tests, bench, sanitizers;
# a stage with too little time left is marked SKIP. A failing stage does not stop the later ones;
# the exit status is 1 if any stage did not pass (FAIL, TIMEOUT or SKIP), else 0.
#
# Knobs (environment): OUT (default /tmp/seft_gpu_check_out), PYTHON (an interpreter with torch;
# default the first of python3, python that imports torch), GPU_CHECK_BUDGET_S, BENCH_BUDGET_S,
# GPU_CHECK_STAGES (a subset, e.g. "build tests"). Without a GPU it runs too (stages fail), e.g.
#     OUT=/tmp/gc PYTHON=/path/to/venv-copy/bin/python bash bench/gpu_check.sh
# but note the build stage pip-installs seft_ext into PYTHON's environment.
# Stage functions run through `bash -c stage_NAME` (exported), so shellcheck sees them as unreachable;
# LOG is set for each stage by run_stage.
# shellcheck disable=SC2317,SC2153
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
OUT="${OUT:-/tmp/seft_gpu_check_out}"
mkdir -p "$OUT" || exit 2
BUDGET_S="${GPU_CHECK_BUDGET_S:-430}"
STAGES_WANTED=" ${GPU_CHECK_STAGES:-build diag tests memcheck racecheck bench} "
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET_S))
WORK=$(mktemp -d /tmp/seft_gpu_check.XXXXXX) || exit 2
export REPO OUT WORK
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_INDEX=1

# ------------------------------------------------------------------ tools
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if command -v nvcc >/dev/null 2>&1; then
  CUDACXX="$(command -v nvcc)"
  export CUDACXX
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
      PY="$(command -v "$c")"
      break
    fi
  done
fi
PY="${PY:-python3}"
CS="$(command -v compute-sanitizer 2>/dev/null || true)"
if [ -z "$CS" ]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -x "$c" ]; then CS="$c"; break; fi
  done
fi
export PY CS

# ------------------------------------------------------------------ helper python scripts
# sanitize_case.py: every op once on tiny inputs (incl. empty rows, slots, an empty weight and
# rejected invalid structures), results checked against the CPU ops. Run under compute-sanitizer.
cat >"$WORK/sanitize_case.py" <<'PYEOF'
import sys
import torch
import seft_ext
from seft_ext import SparseLinear, CSRWeight

ops = torch.ops.seft
assert torch.cuda.is_available(), "no CUDA device"
assert seft_ext.build_info.WITH_CUDA, "seft_ext built without CUDA"
torch.manual_seed(0)
bad = 0
# T = 8: the CUDA-core kernels; T = 130 in bf16 / fp16: the tensor-core kernels (2 token tiles)
for dtype, idx, with_bias, T in ((torch.float32, torch.int16, True, 8), (torch.bfloat16, torch.int32, False, 8),
                                 (torch.bfloat16, torch.int16, True, 130), (torch.float16, torch.int32, False, 130)):
    out, inn = 160, 136
    mask = torch.rand(out, inn) < 0.3
    mask[5] = False
    mask[-1] = False  # empty rows, the last one too
    crow = torch.zeros(out + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0).to(torch.int32)
    col = mask.nonzero()[:, 1].to(idx)
    vals = torch.randn(col.numel()).to(dtype)
    x, dy = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype)
    bias = torch.randn(out).to(dtype) if with_bias else None
    slots = torch.arange(0, col.numel(), 3)
    cpu = (ops.csr_spmm(x, crow, col, vals, bias), ops.csr_spmm_t(dy, crow, col, vals, inn),
           ops.csr_sddmm(dy, x, crow, col, None), ops.csr_sddmm(dy, x, crow, col, slots))
    d = lambda t: None if t is None else t.cuda()  # noqa: E731
    gpu = (ops.csr_spmm(d(x), d(crow), d(col), d(vals), d(bias)), ops.csr_spmm_t(d(dy), d(crow), d(col), d(vals), inn),
           ops.csr_sddmm(d(dy), d(x), d(crow), d(col), None), ops.csr_sddmm(d(dy), d(x), d(crow), d(col), d(slots)))
    torch.cuda.synchronize()
    for name, c, g in zip(("spmm", "spmm_t", "sddmm", "sddmm slots"), cpu, gpu):
        err = float((g.double().cpu() - c.double()).norm() / c.double().norm())
        ok = err < (1e-2 if dtype == torch.bfloat16 else 1e-5)
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {dtype} {idx} {name}: rel err vs CPU {err:.1e}")
    # autograd through SparseLinear on the GPU
    layer = SparseLinear(CSRWeight(d(crow), d(col), d(vals), (out, inn)), d(bias))
    xg = d(x).requires_grad_()
    layer(xg).float().square().sum().backward()
    torch.cuda.synchronize()
    print(f"ok   {dtype} SparseLinear backward: grad norms x {float(xg.grad.float().norm()):.3g}, "
          f"values {float(layer.values.grad.float().norm()):.3g}")
# BSR: 4x4 blocks (CUDA cores) and 16x16 / 32x16 (tensor cores from 64 tokens), 150x200 (not multiples
# of the blocks), empty block rows, slots
from seft_ext import BSRWeight
for dtype, block, T in ((torch.float32, (4, 4), 8), (torch.bfloat16, (16, 16), 8), (torch.bfloat16, (16, 16), 130),
                        (torch.float16, (32, 16), 130)):
    (r, c), out, inn = block, 150, 200
    bmask = torch.rand(-(-out // r), -(-inn // c)) < 0.4
    bmask[0] = False
    bmask[-1] = False
    w = BSRWeight.from_dense(torch.randn(out, inn), block, bmask, dtype=dtype)
    x, dy, bias = torch.randn(T, inn).to(dtype), torch.randn(T, out).to(dtype), torch.randn(out).to(dtype)
    slots = torch.arange(0, w.nnz_blocks, 3)
    cpu = (ops.bsr_spmm(x, w.crow, w.col, w.values, out, bias), ops.bsr_spmm_t(dy, w.crow, w.col, w.values, inn),
           ops.bsr_sddmm(dy, x, w.crow, w.col, r, c), ops.bsr_sddmm(dy, x, w.crow, w.col, r, c, slots))
    W, X, DY = w.to("cuda"), x.cuda(), dy.cuda()
    gpu = (ops.bsr_spmm(X, W.crow, W.col, W.values, out, bias.cuda()), ops.bsr_spmm_t(DY, W.crow, W.col, W.values, inn),
           ops.bsr_sddmm(DY, X, W.crow, W.col, r, c), ops.bsr_sddmm(DY, X, W.crow, W.col, r, c, slots.cuda()))
    torch.cuda.synchronize()
    for name, ref, g in zip(("bsr_spmm", "bsr_spmm_t", "bsr_sddmm", "bsr_sddmm slots"), cpu, gpu):
        err = float((g.double().cpu() - ref.double()).norm() / ref.double().norm())
        ok = err < (1e-5 if dtype == torch.float32 else 1e-2)
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {dtype} {block} T={T} {name}: rel err vs CPU {err:.1e}")
try:  # an invalid block pattern is rejected on the device
    ops.bsr_spmm(torch.randn(4, 8, device="cuda"), torch.tensor([0, 2, 2], dtype=torch.int32, device="cuda"),
                 torch.tensor([1, 0], dtype=torch.int32, device="cuda"), torch.ones(2, 4, 4, device="cuda"), 8)
    print("FAIL an unsorted BSR pattern was accepted")
    bad += 1
except RuntimeError as e:
    print(f"ok   rejected an unsorted BSR pattern: {str(e).splitlines()[0]}")
# an empty weight (nnz 0) and zero tokens
crow0 = torch.zeros(5, dtype=torch.int32, device="cuda")
col0 = torch.zeros(0, dtype=torch.int16, device="cuda")
v0 = torch.zeros(0, device="cuda")
print("empty:", tuple(ops.csr_spmm(torch.randn(3, 7, device="cuda"), crow0, col0, v0, None).shape),
      tuple(ops.csr_spmm_t(torch.randn(3, 4, device="cuda"), crow0, col0, v0, 7).shape),
      tuple(ops.csr_sddmm(torch.randn(0, 4, device="cuda"), torch.randn(0, 7, device="cuda"), crow0, col0, None).shape))
# invalid structures: the device-side checks must reject them without reading out of bounds
x = torch.randn(4, 10, device="cuda")
for crow_l, col_l in (([0, 2, 9], [0, 1, 2]), ([0, 5, 3], [0, 1, 2]), ([0, 2, 3], [1, 0, 2]), ([0, 2, 3], [0, 1, 99])):
    try:
        ops.csr_spmm(x, torch.tensor(crow_l, dtype=torch.int32, device="cuda"),
                     torch.tensor(col_l, dtype=torch.int32, device="cuda"), torch.ones(3, device="cuda"), None)
        print(f"FAIL invalid crow {crow_l} col {col_l} was accepted")
        bad += 1
    except RuntimeError as e:
        print(f"ok   rejected crow {crow_l} col {col_l}: {str(e).splitlines()[0]}")
torch.cuda.synchronize()
print("sanitize_case:", "FAILED" if bad else "done")
sys.exit(1 if bad else 0)
PYEOF

# ------------------------------------------------------------------ stages (each runs in bash -c, under timeout)
detail() { echo "@@ detail: $*"; }
mylog() { tail -n +"$LOG_FROM" "$LOG"; }  # this stage's part of its log (logs are shared by stages)

stage_build() {
  echo "python: $PY"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda)"
  echo "nvcc: $(command -v nvcc || echo 'NOT FOUND')"
  nvcc --version 2>&1 | tail -2
  cmake --version 2>&1 | head -1
  ninja --version 2>&1 | sed 's/^/ninja /'
  "$PY" -m pip --version
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|scikit-build-core|cmake|ninja|pybind11|pytest|hypothesis|numpy) ' || true
  echo "cores: $(nproc)"
  local t0 t1 rc
  t0=$(date +%s)
  SEFT_WITH_CUDA=ON SEFT_CUDA_ARCHS=9.0 "$PY" -m pip install -v --no-build-isolation --no-deps . 2>&1 | tee "$WORK/pip.out"
  rc=$?
  if [ "$rc" -ne 0 ] && grep -q "externally-managed-environment" "$WORK/pip.out"; then
    echo "retrying with --break-system-packages"
    SEFT_WITH_CUDA=ON SEFT_CUDA_ARCHS=9.0 "$PY" -m pip install -v --no-build-isolation --no-deps \
      --break-system-packages .
    rc=$?
  fi
  t1=$(date +%s)
  echo "pip install exit status $rc after $((t1 - t0)) s"
  [ "$rc" -eq 0 ] || { detail "pip install failed (exit $rc) after $((t1 - t0)) s"; return "$rc"; }
  (cd / && "$PY" -c "
import seft_ext, sys
bi = seft_ext.build_info
print('installed', seft_ext.__file__, '| WITH_CUDA', bi.WITH_CUDA, '| nvcc', bi.NVCC_VERSION, '| archs', bi.CUDA_ARCHS)
sys.exit(0 if bi.WITH_CUDA else 1)")
  rc=$?
  detail "pip install $((t1 - t0)) s, CUDA kernels built: $([ "$rc" -eq 0 ] && echo yes || echo NO)"
  return "$rc"
}

stage_diag() {
  local rc=0
  nvidia-smi || rc=1
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,mig.mode.current --format=csv || true
  echo
  (cd / && "$PY" -m seft_ext) || rc=1
  echo
  echo "compute-sanitizer: ${CS:-NOT FOUND}"
  [ -n "$CS" ] && "$CS" --version 2>&1 | tail -2
  uname -a
  free -g 2>/dev/null | head -2
  detail "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo 'no nvidia-smi')"
  return "$rc"
}

stage_tests() {
  local rc=0 line workers=()
  (cd / && "$PY" -c "
import sys, torch, seft_ext
from seft_ext import _lib
ok = torch.cuda.is_available() and _lib.load_error is None and bool(_lib.build_info and _lib.build_info.WITH_CUDA)
print('CUDA tests can run:', ok, '| cuda available', torch.cuda.is_available(), '| load error', _lib.load_error)
sys.exit(0 if ok else 1)") || { echo "ERROR: the CUDA tests cannot run"; rc=1; }
  if ! "$PY" -c "import pytest, hypothesis" >/dev/null 2>&1; then
    echo "ERROR: pytest and hypothesis are needed by the tests"
    detail "pytest or hypothesis not installed"
    return 1
  fi
  if "$PY" -c "import xdist" >/dev/null 2>&1; then workers=(-n 4); fi
  echo "pytest workers: ${workers[*]:-none (no pytest-xdist)}"
  # The op tests' CUDA cases only (SEFT_TEST_DEVICES=cuda: an error if CUDA cannot be tested);
  # their CPU cases run in CI.
  SEFT_TEST_DEVICES=cuda "$PY" -m pytest -q -p no:cacheprovider --durations=15 ${workers[@]+"${workers[@]}"} \
    tests/test_ops.py tests/test_tile_ptr.py tests/test_bsr.py tests/test_cuda_evolve.py || rc=1
  line=$(mylog | grep -E '[0-9]+ (passed|failed|error)' | tail -1)
  detail "pytest: ${line:-no summary line}"
  return "$rc"
}

sanitize() {  # $1: tool
  if [ -z "$CS" ]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    detail "compute-sanitizer not found"
    return 3
  fi
  local rc errs
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1: one cudaMalloc per tensor, so bounds are exact. API errors are
  # not reported: torch probes the driver with calls that fail by design (false alarms).
  echo "== $CS --tool $1 --report-api-errors no (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool "$1" --report-api-errors no --error-exitcode 99 \
    --print-limit 30 "$PY" "$WORK/sanitize_case.py"
  rc=$?
  errs=$(mylog | grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' | tail -1 | sed 's/^=* *//')
  detail "$1 exit $rc; ${errs:-no summary line}"
  return "$rc"
}
stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }

stage_bench() {
  local rc
  echo "bench budget ${BENCH_BUDGET_S} s"
  "$PY" bench/bench_gpu.py --out "$OUT/bench_gpu.md" --budget-s "$BENCH_BUDGET_S"
  rc=$?
  detail "exit $rc; $(grep -c '^| [0-9]' "$OUT/bench_gpu.md" 2>/dev/null || echo 0) table rows; $(grep -c '| skip' "$OUT/bench_gpu.md" 2>/dev/null || echo 0) with skips"
  return "$rc"
}
export -f detail mylog sanitize stage_build stage_diag stage_tests stage_memcheck stage_racecheck stage_bench

# ------------------------------------------------------------------ runner
NAMES=()
STATUS=()
SECS=()
LOGS=()
FIRST=()
DETAILS=()
ANY_FAIL=0

run_stage() {  # name log cap_s min_s reserve_s: runs at most min(cap, time left - reserve), skipped under min
  local name=$1 log="$OUT/$2" cap=$3 min=$4 reserve=$5 now left t start end rc status det n0 secs
  case "$STAGES_WANTED" in *" $name "*) ;; *) return 0 ;; esac
  touch "$log"
  n0=$(wc -l <"$log")
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  t=$((cap < left ? cap : left))
  {
    echo "=================== stage $name ($(date -u '+%Y-%m-%d %H:%M:%S UTC')), time cap ${t} s"
  } >>"$log"
  start=$(date +%s.%N)
  if [ "$left" -lt "$min" ]; then
    echo "SKIPPED: $((DEADLINE - now)) s left before the deadline, ${reserve} s of it kept for later stages; this one needs ${min} s" >>"$log"
    echo "@@ detail: skipped, $((DEADLINE - now)) s left of the ${BUDGET_S} s budget (${reserve} s kept for later stages, needs ${min} s)" >>"$log"
    rc=-1
    status=SKIP
  else
    if [ "$name" = bench ]; then
      BENCH_BUDGET_S="${BENCH_BUDGET_S_FIXED:-$(( (t - 40) < 150 ? (t - 40) : 150 ))}"
      export BENCH_BUDGET_S
    fi
    # shellcheck disable=SC2094  # the stage greps its own log after its commands are done
    LOG="$log" LOG_FROM="$((n0 + 1))" timeout -k 10 "$t" bash -c "set -u -o pipefail; stage_$name" >>"$log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=TIMEOUT ;;
      *) status=FAIL ;;
    esac
  fi
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.0f", b-a}')
  echo "=================== stage $name: $status (exit $rc) after ${secs} s" >>"$log"
  det=$(tail -n +"$((n0 + 1))" "$log" | grep '^@@ detail:' | tail -1 | sed 's/^@@ detail: //')
  [ "$status" = TIMEOUT ] && det="killed at the ${t} s cap${det:+; $det}"
  NAMES+=("$name")
  STATUS+=("$status")
  SECS+=("$secs")
  LOGS+=("$2")
  FIRST+=("$((n0 + 1))")
  DETAILS+=("$det")
  [ "$status" = ok ] || ANY_FAIL=1
  echo "[gpu_check] $name: $status (${secs} s) ${det}"
}

export BENCH_BUDGET_S_FIXED="${BENCH_BUDGET_S:-}"
echo "[gpu_check] repo $REPO, OUT $OUT, python $PY, deadline in ${BUDGET_S} s"
# Priority when time is short: build, tests, bench, then the sanitizers. reserve = seconds before
# the deadline that a stage leaves to the stages after it (the bench gets >= 140 s once the
# tests are done, so its own budget is >= 100 s).
#         name       log            cap  min  reserve
run_stage build      build.log      300  60   0
run_stage diag       diag.log       60   5    0
run_stage tests      tests.log      200  30   100
run_stage memcheck   sanitizer.log  100  30   140
run_stage racecheck  sanitizer.log  100  30   140
run_stage bench      bench.log      210  60   0

# ------------------------------------------------------------------ summary (printed last)
for i in "${!NAMES[@]}"; do
  if [ "${STATUS[$i]}" != ok ]; then
    echo
    echo "----- ${NAMES[$i]}: ${STATUS[$i]}; the last 25 lines of its part of ${LOGS[$i]}"
    tail -n +"${FIRST[$i]}" "$OUT/${LOGS[$i]}" | tail -n 25
  fi
done
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no git")
DIRTY=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ')
{
  echo "# seft_ext gpu_check summary"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); GPU: ${GPU:-none found}; commit ${COMMIT} (${DIRTY:-?} changed files)"
  echo "- total $(($(date +%s) - T0)) s of a ${BUDGET_S} s budget; python $PY"
  echo
  echo "| stage | status | seconds | log | detail |"
  echo "|---|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${LOGS[$i]} | ${DETAILS[$i]//|//} |"
  done
  echo
  echo "overall: $([ "$ANY_FAIL" -eq 0 ] && echo PASS || echo FAIL)"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
rm -rf "$WORK"
exit "$ANY_FAIL"

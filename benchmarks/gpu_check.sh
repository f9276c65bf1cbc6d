#!/usr/bin/env bash
# `make gpu-check`: everything a first session on a GPU machine should run, in one command.
#
#   benchmarks/gpu_check.sh [REPORT_DIR]        (default: $GPU_CHECK_OUT or build/gpu-check)
#
# Builds harmonica._C in place for this machine's GPU only, counts the kernels' SASS per element, runs
# every CUDA test case (CUDA-graph capture and torch.compile(mode="reduce-overhead") included), the op
# benchmarks and an end-to-end DiT-XL/2-shape timing (eager and CUDA graphs), and writes
# REPORT_DIR/report.md and report.json plus the logs of each stage (7 files). Each stage has
# its own time limit, taken from one overall budget, so a hang costs that stage only and the report
# is always written. Without a GPU it says so and exits 0.
#
# PYTHON (default python3) must have torch with CUDA; wheels in .whl/ (make gpu-wheels) are
# installed first into a private folder on PYTHONPATH, for packages that machine lacks.
# GPU_CHECK_SMOKE=1 runs every stage on a machine without a GPU (build for GPU_CHECK_ARCH, default
# 9.0; CUDA tests skip; benchmarks on tiny CPU shapes), to check this script, not the GPU.
# GPU_CHECK_BUDGET_S (default 270) bounds the stages; GPU_CHECK_CAP_SCALE multiplies each stage's
# own cap (a slow machine's smoke run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
REPORT=${1:-${GPU_CHECK_OUT:-build/gpu-check}}
WORK=build/gpu-check-work
BUDGET_S=${GPU_CHECK_BUDGET_S:-270}
start=$(date +%s)
mkdir -p "$REPORT" "$WORK"
REPORT=$(cd "$REPORT" && pwd)
rm -f "$WORK"/*.json "$WORK"/stages.tsv "$REPORT"/*.log "$REPORT"/*.xml
export PYTHONUNBUFFERED=1
failed=0

say() { echo "gpu-check: $*"; }

# Seconds a stage may run: its own cap, or what the overall budget has left.
stage_limit() {
  local cap=$(( $1 * ${GPU_CHECK_CAP_SCALE:-1} )) left=$(( BUDGET_S - ($(date +%s) - start) ))
  echo $(( cap < left ? cap : left ))
}

# run_stage NAME CAP LOG COMMAND...: runs COMMAND under `timeout`, output to the terminal and LOG. A
# stage that would get less than 15 s of the budget is skipped (and the run counts as incomplete).
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local limit stage_start status
  limit=$(stage_limit "$cap")
  if (( limit < 15 )); then
    say "stage $name skipped: the ${BUDGET_S} s budget is spent"
    printf '%s\t%s\t%s\n' "$name" "skipped(budget)" 0 >> "$WORK/stages.tsv"
    failed=1
    return 1
  fi
  stage_start=$(date +%s)
  say "stage $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout" ;;
    *) status="failed($rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - stage_start ))" >> "$WORK/stages.tsv"
  (( rc == 0 )) || failed=1
  return $rc
}

SMOKE=${GPU_CHECK_SMOKE:-0}
smoke_flag=()
if [[ $SMOKE == 1 ]]; then
  smoke_flag=(--smoke)
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "no CUDA GPU visible to $PY (torch.cuda.is_available() is False, or no torch); nothing to check."
  exit 0
fi

# Packages that machine lacks (diffusers), carried as wheels: see `make gpu-wheels`.
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(pwd)/$WORK/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { say "installing the wheels in .whl/ failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# torch's extension builder uses ninja when `ninja` is on PATH; the pip package puts it beside python.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH

# The build for this machine: with a GPU visible and TORCH_CUDA_ARCH_LIST unset, setup.py leaves the
# choice to torch's detection (this GPU's architecture + PTX) and says so on its first line. The smoke
# run has no GPU to detect and names one architecture.
if [[ $SMOKE == 1 ]]; then
  arch_env=(TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCH:-9.0}")
  sm="sm_$(echo "${GPU_CHECK_ARCH:-9.0}" | tr -d .)"
else
  arch_env=(-u TORCH_CUDA_ARCH_LIST)
  sm=$("$PY" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")
fi
run_stage build 150 "$REPORT/build.log" env "${arch_env[@]}" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
if ! "$PY" -c "import sys, harmonica._C as c; sys.exit(0 if c.built_with_cuda else 1)"; then
  say "the build has no CUDA kernels; see $REPORT/build.log"
  printf 'build\tno CUDA kernels\t0\n' >> "$WORK/stages.tsv"
  "$PY" benchmarks/gpu_check.py report --work "$WORK" --report "$REPORT"
  exit 1
fi
grep -m1 -o "harmonica: building.*" "$REPORT/build.log" > "$WORK/build_line.txt" || true
if grep -nE "csrc/[^ ]*(warning|Warning)|warning #" "$REPORT/build.log" > "$WORK/warnings.txt"; then
  say "the build emitted warnings from csrc/:"; cat "$WORK/warnings.txt"
  printf 'warnings\t%s lines\t0\n' "$(wc -l < "$WORK/warnings.txt")" >> "$WORK/stages.tsv"
  failed=1
fi
"$PY" benchmarks/gpu_check.py env --out "$WORK/env.json"

# SASS per element of this build (cuobjdump). The issue's bound, 25 per element for the bf16 forward
# ops on sm_90, is 2.5 per byte of the 10 bytes a cache_write element moves; the forecast ops move up to
# 26 bytes per element (forecast_update of order 4), so the bound is checked per byte.
run_stage sass 30 "$REPORT/bench.log" "$PY" benchmarks/sass_count.py --arch "$sm" --json "$WORK/sass.json" \
  --max-per-byte 2.5
# Every test case of the op suites: the CUDA cases run on this GPU, the CPU ones stay as a control;
# the per-step CUDA-graph capture of a cached DiT run. torch.compile's is a stage of its own (below):
# inductor's compile time is the least predictable part.
run_stage tests 100 "$REPORT/tests.log" "$PY" -m pytest tests/test_ops.py tests/test_cuda_graphs.py \
  -k "not reduce_overhead" -q -p no:cacheprovider -rfEs --junitxml="$REPORT/tests.xml"
run_stage ops 30 "$REPORT/bench.log" "$PY" benchmarks/gpu_check.py ops --out "$WORK/ops.json" "${smoke_flag[@]}"
run_stage e2e 75 "$REPORT/bench.log" "$PY" benchmarks/gpu_check.py e2e --out "$WORK/e2e.json" "${smoke_flag[@]}"
run_stage compile 60 "$REPORT/tests.log" "$PY" -m pytest tests/test_cuda_graphs.py -k reduce_overhead -q \
  -p no:cacheprovider -rfEs --junitxml="$REPORT/compile.xml"

"$PY" benchmarks/gpu_check.py report --work "$WORK" --report "$REPORT"
say "done in $(( $(date +%s) - start )) s"
exit $failed

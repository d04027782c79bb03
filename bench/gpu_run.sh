#!/usr/bin/env bash
# bench/gpu_run.sh [--tiny] OUTDIR: every GPU figure the open issues need, in one device call of at most
# 9 minutes (GPU time comes in 15-minute slots, start-up included, at most 10 minutes a command). Run it
# FIRST in any session that has a GPU, before anything else, and copy summary.md into BENCHMARKS.md.
#
# The device call (prepared and proven on the CPU, 2026-11-28):
#   1. here, once, for the quickstart step's tensorboardX (missing on the lent machines; the benches
#      themselves need nothing beyond torch):   bash bench/gpu_run.sh --wheels
#   2. run(command="bash bench/gpu_run.sh $OUT", carry=[".whl"], timeout_s=600)
#      It needs no kind: an H100 is what it is sized for (an H200 works; name the card it ran on).
#      The synthetic data is generated there (about 20 s); nothing else travels.
#   3. What comes back: $OUT/results.json (every figure and each step's full JSON), summary.md (tables
#      for BENCHMARKS.md), log.txt, steps.tar.gz (the steps' JSON, the profiler trace, the quickstart's
#      files): four files, within the tool's 8.
#
# Steps, most valuable first; each under `timeout` with its own budget, cut to what is left of the whole
# (GPU_RUN_BUDGET, 530 s; a step that cannot get its minimum is skipped, recorded as such). A failing step
# is recorded and the next one runs; results.json and summary.md are rewritten after every step.
#   setup             60 s  wheels, nvidia-smi, env.json, synthetic data at 256x128 and 64x32
#   dgnet_default    110 s  DG-Net at configs/latest.yaml: reference (fp32, the original's costs) and fast
#                           (the GPU defaults): it/s, images/s, peak GPU memory
#   dgnet_captured    80 s  DG-Net's fast mode eager and captured (capture.py: iterations replayed from CUDA
#                           graphs), one process: it/s of both, captured over eager
#   capture_tests     60 s  tests/test_capture.py's GPU tests (pytest -k "gpu and not compiled"): captured
#                           iterations of DG-Net and the teacher against eager ones, a resumed captured run, the
#                           all-reduce in the graph (NCCL, a group of one); on the CPU they are skipped
#   numerics         150 s  captured vs fp32 reference loss curves (and the fast mode eagerly, a third curve),
#                           300 iterations from the same seed; stops itself in time and keeps its curves
#   teacher_default   60 s  the teacher at configs/teacher/market.yaml (batch 32): images/s, memory; reference,
#                           fast and captured (its SGD steps replayed from CUDA graphs)
#   dgnet_r1_conv     60 s  fast and captured with r1_conv=always (r1conv.py: R1's double backward on ordinary
#                           backward kernels), against dgnet_default's and dgnet_captured's figures
#   quickstart_sizes  70 s  DG-Net and teacher at configs/quickstart/*.yaml sizes: reference, fast, captured
#   profile           75 s  torch.profiler over fast iterations: GPU busy time against the iteration, top
#                           operators, phases; a Chrome trace in steps.tar.gz
#   syncs             45 s  host-device syncs per fast iteration, by source line and tensor device
#   r1_bench          30 s  D's step with R1 alone at 256x128, 16 reals: built-in double backward vs r1conv.py
#   dgnet_lazy_r1     50 s  the fast mode with dis.r1_every=16 (StyleGAN2's lazy R1)
#   eval_gpu          60 s  test.py's evaluation on the GPU at Market and MSMT17 sizes, 1,024-d features (DG-Net's):
#                           cosine ranking and k-reciprocal re-ranking (rerank.py's N x N pass there)
#   dgnet_compiled   120 s  captured with compile=true (torch.compile of G and E_a, inductor; its compilation
#                           falls in the untimed warm-up, which once took a whole call), against dgnet_captured's
#   compile_tests     90 s  test_capture.py's compiled GPU test: captured compiled iterations (inductor, bf16)
#                           against the same compiled trainer run eagerly
#   quickstart       rest   bench/gpu_quickstart.sh OUTDIR/quickstart, if that file exists and at least
#                           GPU_QUICKSTART_MIN (150) s are left; it reads its limit from GPU_RUN_STEP_LIMIT
# The budgets add up to more than 530 s: most steps end well within theirs, and what one call leaves
# skipped (summary.md lists it) a second call runs while the machine is still warm (it stays so for about
# 30 s after a call): GPU_RUN_STEPS=a,b,... runs only those steps (setup always runs), e.g.
#   run(command="GPU_RUN_STEPS=numerics,quickstart bash bench/gpu_run.sh $OUT", carry=[".whl"], timeout_s=...)
#
# --tiny runs every step at the tests' tiny sizes on the CPU in a minute or two (tests/test_bench.py);
# there the quickstart step runs only if GPU_QUICKSTART names a script. Other knobs: PYTHON (python3),
# GPU_RUN_DATA (where the synthetic data goes; bench/results/data).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHON=$PY  # bench/gpu_quickstart.sh's interpreter too
COMMAND="bash bench/gpu_run.sh $*"

if [[ ${1:-} == --wheels ]]; then  # runs here, where pip can reach the index; the device cannot
  cd "$REPO"
  # the version this checkout is tested with, else the newest
  version=$("$PY" -c 'import tensorboardX; print(tensorboardX.__version__)' 2>/dev/null || true)
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "tensorboardX${version:+==$version}"
  ls -l .whl
  exit 0
fi

TINY=0
if [[ ${1:-} == --tiny ]]; then TINY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/gpu_run.sh [--tiny] OUTDIR   |   bash bench/gpu_run.sh --wheels" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$REPO"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
LOG="$OUT/log.txt"
: >"$LOG"

START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-$((TINY ? 900 : 530))}
RESERVE=10  # seconds kept for the last report and the tar
export GPU_RUN_START=$START GPU_RUN_BUDGET=$BUDGET GPU_RUN_TINY=$TINY GPU_RUN_COMMAND=$COMMAND
export PYTHONUNBUFFERED=1
DATA=(--data_dir "${GPU_RUN_DATA:-$REPO/bench/results/data}")
QUICKSTART_CONFIGS=(--config configs/quickstart/dgnet.yaml --teacher_config configs/quickstart/teacher.yaml)

if ((TINY)); then
  SIZE=(--tiny --device cpu)
  SPEED=(--iters 1 --warmup 0)  # every Python process costs seconds of imports here: the fewest iterations
  TEACHER=(--iters 2 --warmup 0)
  PROFILE=(--iters 1 --warmup 0 --top 10)
  SYNCS=(--iters 1 --warmup 0)
  NUMERICS=(--iters 1)
  LAZY=(--iters 1 --warmup 0)
  R1=(--device cpu --height 64 --width 32 --batch 2 --iters 1 --warmup 0)
  # dynamo's tracing, run eagerly: the step's plumbing, not inductor's C++ code generation (minutes on a CPU) nor
  # AOT autograd (30 s here; tests/test_capture.py's compiled test runs the compiled step through aot_eager)
  COMPILE=(--compile eager)
  EVAL=(--quick --device cpu --cases quick-features quick-rerank quick-aqe)
  QUICKSTART_SCRIPT=${GPU_QUICKSTART:-}
  QUICKSTART_MIN=${GPU_QUICKSTART_MIN:-1}
else
  SIZE=()
  SPEED=(--iters 30 --warmup 5)
  TEACHER=(--iters 60 --warmup 5)
  PROFILE=(--iters 3 --warmup 3 --top 25)
  SYNCS=(--iters 2 --warmup 2)
  NUMERICS=(--iters 300)
  LAZY=(--iters 32 --warmup 5)  # two lazy R1 steps in any 32 iterations: a fair average
  R1=(--iters 20 --warmup 3)
  COMPILE=(--compile inductor)
  EVAL=(--device cuda --dim 1024 --cases market-features market-rerank market-aqe msmt-features msmt-rerank msmt-aqe)
  QUICKSTART_SCRIPT=${GPU_QUICKSTART:-bench/gpu_quickstart.sh}
  QUICKSTART_MIN=${GPU_QUICKSTART_MIN:-150}
fi
# the captured iteration (issue 17): timed beside the eager fast mode, and the numerics' compared side (on the CPU,
# --tiny, capture.py's graph-safe form runs eagerly)
CAPTURED=(--mode captured)

say() { echo "[gpu_run $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
report() { "$PY" bench/gpu_report.py report "$WORK" "$OUT" || say "report failed (rc $?)"; }
left() { echo $((BUDGET - ($(date +%s) - START) - RESERVE)); }

finish() {
  local rc=$?
  report
  # one archive for everything else: the tool brings back at most 8 files
  tar czf "$OUT/steps.tar.gz" -C "$WORK" . 2>/dev/null || true
  if [[ -f $OUT/steps.tar.gz ]] && (($(stat -c %s "$OUT/steps.tar.gz") > 15 * 1024 * 1024)); then
    tar czf "$OUT/steps.tar.gz" -C "$WORK" --exclude='*trace*' . || true  # over the tool's 16 MiB a file
  fi
  say "done in $(($(date +%s) - START)) s; $OUT: $(cd "$OUT" && echo *)"
  [[ -f $OUT/summary.md ]] && cat "$OUT/summary.md"
  rm -rf "$WORK"
  exit "$rc"
}
trap finish EXIT

# selected NAME: whether this call runs step NAME (GPU_RUN_STEPS, when set, names them; the setup always runs)
selected() {
  [[ -z ${GPU_RUN_STEPS:-} || $1 == env || $1 == data_* || ,$GPU_RUN_STEPS, == *",$1,"* ]]
}

# step NAME BUDGET MIN CMD...: CMD under `timeout` for BUDGET seconds or what is left, if that is at least MIN
step() {
  local name=$1 budget=$2 min=$3
  shift 3
  local limit rc status t0 t1
  selected "$name" || return 0
  limit=$(left)
  ((budget < limit)) && limit=$budget
  if ((limit < min)); then
    say "== $name: skipped, ${limit} s left and it needs ${min} s"
    "$PY" bench/gpu_report.py step "$WORK" "$name" skipped 0 0 "$limit" -- "$@" || say "step record failed"
    report
    return 0
  fi
  say "== $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  set +e
  # timeout kills the step's whole process group (the loader workers too); KILL 15 s after TERM
  GPU_RUN_STEP_LIMIT=$limit timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$(date +%s.%N)
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  say "== $name: $status (rc $rc)"
  "$PY" bench/gpu_report.py step "$WORK" "$name" "$status" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$limit" -- "$@" \
    || say "step record failed"
  report
}

BENCH=("$PY" bench/train_bench.py "${SIZE[@]}" "${DATA[@]}")
say "$COMMAND: budget $BUDGET s, work folder $WORK"

# ---- setup: what a bare machine lacks, what it is, the data (generated there, never carried)
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("tensorboardX") is None)'; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_run_site \
      .whl/*.whl 2>&1 | tee -a "$LOG" || say "wheel install failed"
    export PYTHONPATH=/tmp/gpu_run_site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "tensorboardX is missing and .whl/ holds no wheels: train.py (the quickstart step) will fail"
  fi
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | tee -a "$LOG" || true; fi
step env 30 1 "$PY" bench/gpu_report.py env "$WORK"
if ((!TINY)) && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  say "no CUDA device: this script measures a GPU (use --tiny on a CPU)"
  exit 2
fi
mkdir -p "$WORK/setup"
step data_default 40 10 "${BENCH[@]}" --bench data --json "$WORK/setup/data_default.json"
if ((!TINY)); then  # tiny sizes are one dataset for both configs
  step data_quickstart 30 5 "${BENCH[@]}" "${QUICKSTART_CONFIGS[@]}" --bench data --json "$WORK/setup/data_quickstart.json"
fi

# ---- the measurements, most valuable first: the speed of DG-Net eager and captured, the GPU tests that prove
# the captured iterations right, their numerics, the teacher; then the other ways of running DG-Net, the sizes
# of the quickstart, where the time goes; compilation last (its warm-up can take minutes)
step dgnet_default 110 40 "${BENCH[@]}" --model dgnet "${SPEED[@]}" --json "$WORK/dgnet_default.json"
step dgnet_captured 80 30 "${BENCH[@]}" --model dgnet --mode fast,captured "${SPEED[@]}" \
  --json "$WORK/dgnet_captured.json"
step capture_tests 60 20 env NCCL_DEBUG=WARN "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_capture.py -k "gpu and not compiled"
# numerics stops comparing 30 s before its limit (start-up and writing included) and keeps what it has
limit=$(left)
((limit > 150)) && limit=150
step numerics 150 60 "${BENCH[@]}" --bench numerics "${NUMERICS[@]}" --time_limit $((limit - 30 > 5 ? limit - 30 : 5)) \
  --json "$WORK/numerics.json" "${CAPTURED[@]}"
step teacher_default 60 20 "${BENCH[@]}" --model teacher --mode reference,fast,captured "${TEACHER[@]}" \
  --json "$WORK/teacher_default.json"
step dgnet_r1_conv 60 25 "${BENCH[@]}" --model dgnet --mode fast,captured "${SPEED[@]}" --fast_opts r1_conv=always \
  --json "$WORK/dgnet_r1_conv.json"
step quickstart_sizes 70 30 "${BENCH[@]}" "${QUICKSTART_CONFIGS[@]}" --mode reference,fast,captured "${SPEED[@]}" \
  --json "$WORK/quickstart_sizes.json"
step profile 75 30 "${BENCH[@]}" --bench profile "${PROFILE[@]}" --trace "$WORK/trace/profile_trace.json" \
  --json "$WORK/profile.json"
step syncs 45 20 "${BENCH[@]}" --bench syncs "${SYNCS[@]}" --json "$WORK/syncs.json"
step r1_bench 30 15 "$PY" bench/r1_bench.py "${R1[@]}" --json "$WORK/r1_bench.json"
step dgnet_lazy_r1 50 25 "${BENCH[@]}" --model dgnet --mode fast "${LAZY[@]}" --json "$WORK/dgnet_lazy_r1.json" \
  --fast_opts dis.r1_every=16
step eval_gpu 60 30 "$PY" bench/eval_bench.py "${EVAL[@]}" --out "$WORK/eval_gpu.json"
# captured only (dgnet_captured has the eager row): one compilation, not two
step dgnet_compiled 120 60 "${BENCH[@]}" --model dgnet --mode captured "${COMPILE[@]}" "${SPEED[@]}" \
  --json "$WORK/dgnet_compiled.json"
step compile_tests 90 40 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_capture.py -k "gpu and compiled"

# ---- the GPU quickstart (bench/gpu_quickstart.sh, written separately), with whatever time is left
if [[ -n $QUICKSTART_SCRIPT && -f $QUICKSTART_SCRIPT ]]; then
  mkdir -p "$WORK/quickstart"
  step quickstart 100000 "$QUICKSTART_MIN" bash "$QUICKSTART_SCRIPT" "$WORK/quickstart"
elif selected quickstart; then
  say "== quickstart: skipped, no script (${QUICKSTART_SCRIPT:-none in --tiny without GPU_QUICKSTART})"
  "$PY" bench/gpu_report.py step "$WORK" quickstart skipped 0 0 0 -- bash "${QUICKSTART_SCRIPT:-bench/gpu_quickstart.sh}"
fi

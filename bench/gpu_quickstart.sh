#!/usr/bin/env bash
# The quickstart on a GPU, end to end, in about 15 minutes on an H100 (not yet timed: the teacher's 8,000
# iterations at the 60-100 iterations/s and DG-Net at the 6-7 iterations/s measured there at gen.dim 8,
# BENCHMARKS.md 2026-11-23): what `make quickstart` does on a GPU. Synthetic data with
# 3,000 training identities, the teacher of configs/quickstart/teacher_gpu.yaml and its R1/mAP, DG-Net at
# configs/quickstart/dgnet_gpu.yaml (4,800 iterations with the original's proportions), E_a's R1/mAP beside
# the teacher's, then `visualize.py metrics` (swap fidelity and the identity judge), `bench/part_judge.py`
# (where the swaps lose A's colours, per body part) and the swap grids.
# Everything it makes goes to OUTDIR:
#   OUTDIR/work/       datasets and runs (outputs/quickstart-gpu-teacher, outputs/quickstart-gpu)
#   OUTDIR/*.json      teacher.json, dgnet_reid.json, generation.json, part_judge.json, summary.json
#   OUTDIR/*.jpg       the training grids of the last iteration, swap.jpg, rainbow.jpg
#   OUTDIR/*.log       each step's console output
#
#   bash bench/gpu_quickstart.sh OUTDIR
#   QUICKSTART_TINY=1 bash bench/gpu_quickstart.sh OUTDIR   # CPU smoke run: tiny data, 2 iterations each
#
# PYTHON picks the interpreter (default: python3). QUICKSTART_ITERS overrides the DG-Net iteration count
# (the warm-ups and decay follow it in the config's proportions). QUICKSTART_DGNET_OPTS adds DG-Net config
# overrides, space-separated KEY=VALUE (e.g. "f_grad_w=1"), recorded in summary.json. QUICKSTART_LIMIT
# (or GPU_RUN_STEP_LIMIT, which bench/gpu_run.sh sets) is the whole script's time in seconds: the teacher's
# training then stops itself after at most a third of the time left, DG-Net's early enough to leave
# QUICKSTART_RESERVE (90) s for the evaluation, the metrics and the grids (SIGTERM: train.py finishes the
# iteration and saves; what follows uses that last checkpoint), each at least QUICKSTART_MIN_TRAIN (30) s. The
# script stops at the first failing step.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_quickstart.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK="$OUT/work"
DATA="$WORK/datasets/synthetic"
TEACHER_RUN=quickstart-gpu-teacher
TEACHER="$WORK/outputs/$TEACHER_RUN"
RUN=quickstart-gpu
mkdir -p "$WORK"
cd "$REPO"

CONFIG=configs/quickstart/dgnet_gpu.yaml
CONFIG_ITERS=4800  # its max_iter
if [ "${QUICKSTART_TINY:-0}" = "1" ]; then
    ITERS=${QUICKSTART_ITERS:-2}
    DATA_OPTS=(synthetic.ids=8 synthetic.test_ids=4 synthetic.images_per_id=6)
    TEACHER_OPTS=(max_iter=2 step_size=2 snapshot_save_iter=2 log_iter=1 batch_size=8 num_workers=0)
    # the conftest's tiny networks: the CPU smoke run checks the wiring, not the results
    DGNET_OPTS=(batch_size=4 num_workers=0 gen.dim=4 gen.mlp_dim=16 dis.dim=8 dis.n_res=1 display_size=2)
else
    ITERS=${QUICKSTART_ITERS:-$CONFIG_ITERS}
    DATA_OPTS=()
    TEACHER_OPTS=()
    DGNET_OPTS=()
fi
SCHEDULE=()
if [ "$ITERS" != "$CONFIG_ITERS" ]; then  # the config's proportions at another length
    # every ramped weight (caps 1, 2, 2) reaches its cap by 40 % of the run: 2 / (10 % of ITERS) per iteration
    RAMP=$($PY -c "print(2 / max(1, $ITERS // 10))")
    EVERY=$((ITERS / 6 > 0 ? ITERS / 6 : 1))
    SCHEDULE=(max_iter="$ITERS" warm_iter=$((ITERS * 3 / 10)) warm_teacher_iter=$((ITERS * 3 / 10))
              warm_scale="$RAMP" step_size=$((ITERS * 6 / 10)) log_iter="$EVERY" fidelity_iter="$EVERY"
              image_display_iter="$ITERS" image_save_iter="$ITERS" snapshot_save_iter="$ITERS")
fi
COMMON=(data_root="$DATA" "${DATA_OPTS[@]}")
read -r -a EXTRA_OPTS <<< "${QUICKSTART_DGNET_OPTS:-}"

step() {  # step NAME COMMAND...: run, keep the console output in OUTDIR/NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS rc=0
    "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    echo "== $name took $((SECONDS - start)) s (rc $rc)"
    return $rc
}

LIMIT=${QUICKSTART_LIMIT:-${GPU_RUN_STEP_LIMIT:-0}}  # 0: no limit
RESERVE=${QUICKSTART_RESERVE:-90}
MIN_TRAIN=${QUICKSTART_MIN_TRAIN:-30}  # the shortest time a training step is given under a limit
train_timeout() {  # train_timeout N: 1/N of the time left before the reserve, as a `timeout` prefix for a
    # training step (none without a limit)
    if [ "$LIMIT" -gt 0 ]; then
        local left=$(((LIMIT - SECONDS - RESERVE) / $1))
        # --foreground: train.py stays in this script's process group, so a timeout around the whole script
        # (gpu_run.sh's step) reaches it too; train.py ends its own loader workers
        echo timeout --foreground -s TERM -k 60 $((left > MIN_TRAIN ? left : MIN_TRAIN))
    fi
}
limit_stopped() {  # after a training step failed with code $1: go on from its save if the limit stopped it
    [ "$1" = 124 ] || [ "$1" = 143 ] || exit "$1"
}

step data "$PY" -m data --config "$CONFIG" --opts "${COMMON[@]}"
# shellcheck disable=SC2046  # the timeout prefixes are words
step teacher $(train_timeout 3) "$PY" train.py --config configs/quickstart/teacher_gpu.yaml --trainer baseline \
    --name "$TEACHER_RUN" --output_path "$WORK" --opts "${COMMON[@]}" "${TEACHER_OPTS[@]}" || limit_stopped $?
step teacher_test "$PY" test.py --name "$TEACHER_RUN" --output_path "$WORK"
# shellcheck disable=SC2046
step dgnet $(train_timeout 1) "$PY" train.py --config "$CONFIG" --name "$RUN" --output_path "$WORK" --opts \
    "${COMMON[@]}" teacher="$TEACHER" pretrained="$TEACHER" "${DGNET_OPTS[@]}" "${SCHEDULE[@]}" \
    "${EXTRA_OPTS[@]}" || limit_stopped $?
REACHED=$(ls "$WORK/outputs/$RUN/checkpoints/" | sed -n 's/^0*\([0-9][0-9]*\)\.pt$/\1/p' | sort -n | tail -1)
step dgnet_test "$PY" test.py --name "$RUN" --output_path "$WORK"
step metrics "$PY" visualize.py metrics --name "$RUN" --output_path "$WORK"
step parts "$PY" bench/part_judge.py --name "$RUN" --output_path "$WORK" --json "$OUT/part_judge.json"
step swap "$PY" visualize.py swap --name "$RUN" --output_path "$WORK" --count 8 --zoom 2 --out "$OUT/swap.jpg" \
    --overwrite
step rainbow "$PY" visualize.py rainbow --name "$RUN" --output_path "$WORK" --count 6 --zoom 2 \
    --out "$OUT/rainbow.jpg" --overwrite

RUNDIR="$WORK/outputs/$RUN"
cp "$(ls "$RUNDIR"/results/generation_[0-9]*.json | tail -1)" "$OUT/generation.json"
cp "$(ls "$TEACHER"/results/[0-9]*.json | tail -1)" "$OUT/teacher.json"
cp "$(ls "$RUNDIR"/results/[0-9]*.json | tail -1)" "$OUT/dgnet_reid.json"
for grid in "$RUNDIR"/images/*"$(printf %08d "$REACHED")"*.jpg; do
    [ -e "$grid" ] && cp "$grid" "$OUT/"
done
"$PY" - "$OUT" "$ITERS" "$REACHED" "${EXTRA_OPTS[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out, iters, reached = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
teacher, dgnet = (json.loads((out / f"{n}.json").read_text()) for n in ("teacher", "dgnet_reid"))
judge = json.loads((out / "generation.json").read_text())["swap_fidelity"]["identity_judge"]


def reid(r):
    m = r.get("metrics", r)
    return {k: m[k] for k in ("R1", "mAP") if k in m}


summary = {"iterations": iters, "reached": reached, "dgnet_opts": sys.argv[4:], "teacher": reid(teacher),
           "appearance_encoder": reid(dgnet),
           "identity_judge": {k: judge[k] for k in ("chance", "swap", "reconstruction", "true_swap", "structure_image",
                                                    "appearance_image", "flat_mean_colour")}}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF

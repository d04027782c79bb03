#!/usr/bin/env bash
# The quickstart on a GPU, end to end, in about 5 minutes on an H100 (6-7 DG-Net iterations/s there,
# BENCHMARKS.md 2026-11-23): synthetic data, the quickstart teacher and its R1/mAP, DG-Net at
# configs/quickstart/dgnet_gpu.yaml (what `make quickstart` trains on a GPU: 1,500 iterations with the
# original's proportions), E_a's R1/mAP beside the teacher's, then `visualize.py metrics` (swap fidelity
# and the identity judge) and the swap grids. Everything it makes goes to OUTDIR:
#   OUTDIR/work/       datasets and runs (outputs/quickstart-teacher, outputs/quickstart-gpu)
#   OUTDIR/*.json      teacher.json, dgnet_reid.json, generation.json, summary.json
#   OUTDIR/*.jpg       the training grids of the last iteration, swap.jpg, rainbow.jpg
#   OUTDIR/*.log       each step's console output
#
#   bash bench/gpu_quickstart.sh OUTDIR
#   QUICKSTART_TINY=1 bash bench/gpu_quickstart.sh OUTDIR   # CPU smoke run: tiny data, 2 iterations each
#
# PYTHON picks the interpreter (default: python). QUICKSTART_ITERS overrides the DG-Net iteration count
# (the warm-ups and decay follow it in the config's proportions). The script stops at the first failing step.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_quickstart.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK="$OUT/work"
DATA="$WORK/datasets/synthetic"
TEACHER="$WORK/outputs/quickstart-teacher"
RUN=quickstart-gpu
mkdir -p "$WORK"
cd "$REPO"

CONFIG=configs/quickstart/dgnet_gpu.yaml
CONFIG_ITERS=1500  # its max_iter
if [ "${QUICKSTART_TINY:-0}" = "1" ]; then
    ITERS=${QUICKSTART_ITERS:-2}
    DATA_OPTS=(synthetic.ids=8 synthetic.images_per_id=6)
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

step() {  # step NAME COMMAND...: run, keep the console output in OUTDIR/NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name took $((SECONDS - start)) s"
}

step data "$PY" -m data --config configs/quickstart/dgnet.yaml --opts "${COMMON[@]}"
step teacher "$PY" train.py --config configs/quickstart/teacher.yaml --trainer baseline --name quickstart-teacher \
    --output_path "$WORK" --opts "${COMMON[@]}" "${TEACHER_OPTS[@]}"
step teacher_test "$PY" test.py --name quickstart-teacher --output_path "$WORK"
step dgnet "$PY" train.py --config "$CONFIG" --name "$RUN" --output_path "$WORK" --opts \
    "${COMMON[@]}" teacher="$TEACHER" pretrained="$TEACHER" "${DGNET_OPTS[@]}" "${SCHEDULE[@]}"
step dgnet_test "$PY" test.py --name "$RUN" --output_path "$WORK"
step metrics "$PY" visualize.py metrics --name "$RUN" --output_path "$WORK"
step swap "$PY" visualize.py swap --name "$RUN" --output_path "$WORK" --count 8 --zoom 2 --out "$OUT/swap.jpg" \
    --overwrite
step rainbow "$PY" visualize.py rainbow --name "$RUN" --output_path "$WORK" --count 6 --zoom 2 \
    --out "$OUT/rainbow.jpg" --overwrite

RUNDIR="$WORK/outputs/$RUN"
cp "$RUNDIR/results/generation.json" "$OUT/generation.json"
cp "$(ls "$TEACHER"/results/[0-9]*.json | tail -1)" "$OUT/teacher.json"
cp "$(ls "$RUNDIR"/results/[0-9]*.json | tail -1)" "$OUT/dgnet_reid.json"
for grid in "$RUNDIR"/images/*"$(printf %08d "$ITERS")"*.jpg; do
    [ -e "$grid" ] && cp "$grid" "$OUT/"
done
"$PY" - "$OUT" "$ITERS" <<'EOF'
import json
import sys
from pathlib import Path

out, iters = Path(sys.argv[1]), int(sys.argv[2])
teacher, dgnet = (json.loads((out / f"{n}.json").read_text()) for n in ("teacher", "dgnet_reid"))
judge = json.loads((out / "generation.json").read_text())["swap_fidelity"]["identity_judge"]


def reid(r):
    m = r.get("metrics", r)
    return {k: m[k] for k in ("R1", "mAP") if k in m}


summary = {"iterations": iters, "teacher": reid(teacher), "appearance_encoder": reid(dgnet),
           "identity_judge": {k: judge[k] for k in ("chance", "swap", "true_swap", "structure_image",
                                                    "appearance_image", "flat_mean_colour")}}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF

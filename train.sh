#!/usr/bin/env bash
# The guided run: 1. environment check  2. data check  3. quick debug (3 epochs, 100 samples)
#                 4. full training (and, on the demo data, its evaluation).
#
#   ./train.sh                 asks before each step when a person is at the terminal
#   ./train.sh -y              runs every step unattended (also when there is no terminal)
#
# Point it at your data here, or with SIM_ROOT=... CSV_ROOT=... ./train.sh, or
# ./train.sh --sim_root DIR --csv_root DIR. With no data configured it makes a demo data set with
# the built-in simulator and runs the whole path on it (about 10 minutes on a 2-core CPU): on a CPU it
# fine-tunes the shipped starter weights (starter/MODEL_CARD.md), then scores the demo's held-out
# pages and draws one of them (predicted against true traces).
# Anything after -- goes to production_trainer.py (e.g. -- --epochs 50 --lr 2e-4).
set -euo pipefail
cd "$(dirname "$0")"

SIM_ROOT="${SIM_ROOT:-}"        # e.g. /path/to/your/simulations-V37  ({id}-{k}.png + .json)
CSV_ROOT="${CSV_ROOT:-}"        # e.g. /path/to/your/train            (train.csv, {id}/{id}.csv)
EPOCHS="${EPOCHS:-100}"
OUTPUT_DIR="${OUTPUT_DIR:-experiments}"
DEMO_DIR="${DEMO_DIR:-demo_data}"
DEMO_RECORDS="${DEMO_RECORDS:-110}"
DEMO_EPOCHS="${DEMO_EPOCHS:-10}"
# IMAGE_SIZE="H W" and ENCODER_OVERRIDE=name replace the per-device suggestion (tests use tiny ones);
# VENV_PYTHON=path the interpreter of the steps (default .venv/bin/python, which setup.sh makes).
ASSUME_YES=0
TRAINER_ARGS=()

while [ $# -gt 0 ]; do
    case "$1" in
        -y|--yes) ASSUME_YES=1 ;;
        --sim_root) SIM_ROOT="$2"; shift ;;
        --csv_root) CSV_ROOT="$2"; shift ;;
        --epochs) EPOCHS="$2"; shift ;;
        --output_dir) OUTPUT_DIR="$2"; shift ;;
        --) shift; TRAINER_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument $1 (see ./train.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -t 0 ] || ASSUME_YES=1        # no terminal: nobody to ask

step() { echo; echo "==== Step $1: $2"; }
fail() { echo "ERROR: $*" >&2; exit 1; }
confirm() {
    [ "$ASSUME_YES" = 1 ] && return 0
    read -r -p "$1 [Y/n] " answer
    case "$answer" in [nN]*) echo "stopped."; exit 0 ;; esac
}

step 1 "environment check"
confirm "Check Python and packages (installs what is missing into .venv)?"
./setup.sh
PY="${VENV_PYTHON:-.venv/bin/python}"
# The device decides the suggested batch size, worker count and (on CPU) a CPU-sized encoder and input.
read -r DEVICE BATCH WORKERS ENCODER IMAGE_H IMAGE_W < <($PY - <<'EOF'
import os, torch
cpus = os.cpu_count() or 1
if torch.cuda.is_available():
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    batch = 8 if gib < 12 else 16 if gib < 30 else 32 if gib < 60 else 64
    print('cuda', batch, min(8, cpus), 'resnet34', 256, 1344)
elif torch.backends.mps.is_available():
    print('mps', 4, min(2, cpus), 'resnet34', 256, 1344)
else:
    print('cpu', 4, min(2, cpus), 'tu-regnetx_002', 128, 672)   # 4x the steps of 256 x 1344: measured better in 30 min
EOF
)
if [ -n "${IMAGE_SIZE:-}" ]; then read -r IMAGE_H IMAGE_W <<< "$IMAGE_SIZE"; fi
[ -n "${ENCODER_OVERRIDE:-}" ] && ENCODER="$ENCODER_OVERRIDE"
echo "device: $DEVICE -> suggested --batch_size $BATCH --num_workers $WORKERS --encoder $ENCODER --image_size $IMAGE_H $IMAGE_W"

step 2 "data check"
DEMO=0
if [ -z "$SIM_ROOT" ] && [ -z "$CSV_ROOT" ]; then
    DEMO=1
    SIM_ROOT="$DEMO_DIR"; CSV_ROOT="$DEMO_DIR"; EPOCHS="$DEMO_EPOCHS"
    echo "No data configured: making a demo data set of $DEMO_RECORDS records in $DEMO_DIR with the built-in simulator."
    echo "For real data: set SIM_ROOT and CSV_ROOT at the top of train.sh, or run"
    echo "  ./train.sh --sim_root /path/to/simulations --csv_root /path/to/train"
    confirm "Make the demo data?"
    if [ ! -f "$DEMO_DIR/train.csv" ]; then
        $PY ecg_simulator.py --out "$DEMO_DIR" --n "$DEMO_RECORDS" --seed 0 --dpi_choices 100 150
    else
        echo "reusing $DEMO_DIR"
    fi
fi
[ -n "$SIM_ROOT" ] && [ -n "$CSV_ROOT" ] || fail "set both SIM_ROOT and CSV_ROOT (got '$SIM_ROOT' and '$CSV_ROOT')"
[ -d "$SIM_ROOT" ] || fail "SIM_ROOT $SIM_ROOT: no such folder"
[ -d "$CSV_ROOT" ] || fail "CSV_ROOT $CSV_ROOT: no such folder"
[ -f "$CSV_ROOT/train.csv" ] || fail "CSV_ROOT $CSV_ROOT: no train.csv (id,fs,sig_len) in it"
[ -n "$(find "$SIM_ROOT" -name '*.png' -print -quit)" ] || fail "SIM_ROOT $SIM_ROOT: no PNG images found"
confirm "Validate the data (counts, sampling rates, problems, preview)?"
CHECK_LOG=$(mktemp)
$PY production_dataset.py --sim_root "$SIM_ROOT" --csv_root "$CSV_ROOT" --max_samples 100 \
    --image_size "$IMAGE_H" "$IMAGE_W" --preview "$OUTPUT_DIR/data_check/preview.png" | tee "$CHECK_LOG" \
    || fail "data check failed: see the messages above"
grep -q 'usable: [1-9]' "$CHECK_LOG" || fail "no usable sample: do the image ids match train.csv ids? (see the problems above)"

COMMON=(--sim_root "$SIM_ROOT" --csv_root "$CSV_ROOT" --batch_size "$BATCH" --num_workers "$WORKERS"
        --encoder "$ENCODER" --image_size "$IMAGE_H" "$IMAGE_W" --output_dir "$OUTPUT_DIR")
[ "$DEVICE" = cpu ] && COMMON+=(--lr 1e-3)     # short CPU runs learn from scratch only with a larger step
[ "$DEMO" = 1 ] && COMMON+=(--cache)
STARTER=starter/ecg_starter.pth
if [ "$DEMO" = 1 ] && [ -f "$STARTER" ] && [ "$ENCODER" = tu-regnetx_002 ]; then
    COMMON+=(--init_from "$STARTER")   # the starter's architecture: the demo fine-tunes a model that reads
    echo "demo: fine-tuning the starter weights $STARTER (see starter/MODEL_CARD.md)"
fi

step 3 "quick debug (3 epochs on 100 samples)"
confirm "Run the quick debug training?"
$PY production_trainer.py "${COMMON[@]}" --debug "${TRAINER_ARGS[@]}" || fail "quick debug failed: fix it before full training"

step 4 "full training ($EPOCHS epochs)"
confirm "Start the full training?"
RUN_LOG=$(mktemp)
$PY production_trainer.py "${COMMON[@]}" --epochs "$EPOCHS" "${TRAINER_ARGS[@]}" | tee "$RUN_LOG"
RUN_DIR=$(grep -o 'run folder [^;]*' "$RUN_LOG" | tail -1 | cut -d' ' -f3)
echo "run folder: $RUN_DIR"
echo "watch it:   $PY -m tensorboard.main --logdir $RUN_DIR/tensorboard --port 6006"
if [ "$DEMO" = 1 ]; then
    $PY evaluate.py --checkpoint "$RUN_DIR/checkpoints/best.pth"
    # one held-out page (a record of the validation split) drawn with its predicted and true traces
    HELD_OUT=$($PY -c "import sys, pandas as pd; print(pd.read_csv(sys.argv[1], dtype={'record_id': str}).record_id[0])" \
               "$RUN_DIR/checkpoints/best_eval.csv")
    PAGE=$(find "$SIM_ROOT/$HELD_OUT" -name "$HELD_OUT-*.png" | sort | head -1)
    $PY visualize.py --image "$PAGE" --checkpoint "$RUN_DIR/checkpoints/best.pth" \
        --output "$RUN_DIR/demo_held_out_page.png"
    echo
    echo "Demo done: held-out scores above, picture of a held-out page: $RUN_DIR/demo_held_out_page.png"
    echo "Train on real data with: ./train.sh --sim_root /path/to/simulations --csv_root /path/to/train"
fi

#!/usr/bin/env bash
# Masked-reconstruction TTT on CIFAR-10-C (issue 22), inside one 10-minute device call: trains a masked recipe on the
# archive, corrupts its 10,000 test images at severity 5 (the 15 corruptions), and runs source + ttt-online on all of
# them and source + ttt on the first TTT_N of each corruption, then writes $OUT/table.md and $OUT/table.json.
#
#   bash benchmarks/masked_gpu.sh ARCHIVE RECIPE        e.g. .carry/cifar10-jpeg.tar.gz recipes/masked-vit-tiny.yaml
#
# Every stage has its own time limit, cut to what is left of DEADLINE (570 s), so the call returns with whatever
# finished. Logs, results and the checkpoint (model.* files: ~3 MB for the ResNet, ~21 MB for the ViT) land in $OUT.
# Environment (defaults in brackets):
#   CKPT           a trained checkpoint folder: skip training (say the one an earlier call returned, carried in)
#   STAGES         [train corrupt online ttt] which stages run, in this order
#   TTT_N          [1000] images per corruption for ttt (episodic costs copies x steps passes per image)
#   ONLINE_N       [all] images per corruption for ttt-online
#   TTT_FLAGS, ONLINE_FLAGS   extra `tta adapt` flags, e.g. "--lr 0.005 --set momentum=0.9 --steps 20" (TTT-MAE's SGD)
#   TRAIN_ARGS, CORRUPT_ARGS, ADAPT_ARGS   extra flags for every train / corrupt / adapt call (the CPU test's tiny sizes)
#   TRAIN_TIMEOUT [330], CORRUPT_TIMEOUT [120], ONLINE_TIMEOUT [300], TTT_TIMEOUT [200], DEADLINE [570] seconds
set -uo pipefail
ARCHIVE=$1 RECIPE=$2
NAME=$(basename "$RECIPE" .yaml)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
WORK=${WORK:-$PWD/.work/masked}
export TTA_CACHE_DIR=${TTA_CACHE_DIR:-$WORK/tta-cache} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}
PYTHON=${PYTHON:-python3}
TTA="$PYTHON -m tta_cli.cli"
CKPT=${CKPT:-$WORK/$NAME}
SETS=$WORK/cifar10-c
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
# cap LIMIT: LIMIT, or the seconds left before DEADLINE less a 10 s margin for the table (at least 1)
cap() { local left=$(( ${DEADLINE:-570} - ($(date +%s) - START) - 10 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
stamp() { echo "=== $1 at $(( $(date +%s) - START )) s"; }

for stage in ${STAGES:-train corrupt online ttt}; do
  stamp "$stage"
  case $stage in
    train)
      if [ -f "$CKPT/model.safetensors" ]; then echo "trained already: $CKPT"; continue; fi
      timeout "$(cap "${TRAIN_TIMEOUT:-330}")" $TTA train "$RECIPE" --data "$ARCHIVE" --out "$CKPT" --force ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1
      echo "train exit $?"; grep -E "test_acc|train_seconds|train_images_per_s|error" "$OUT/train.log" | tail -4
      mkdir -p "$OUT/ckpt" && cp "$CKPT"/model.* "$OUT/ckpt/" 2>/dev/null ;;
    corrupt)
      if [ -f "$SETS/labels.npy" ]; then echo "corrupted already: $SETS"; continue; fi
      timeout "$(cap "${CORRUPT_TIMEOUT:-120}")" $TTA corrupt --data "$ARCHIVE" --severities 5 --seed 0 --out "$SETS" ${CORRUPT_ARGS:-} > "$OUT/corrupt.log" 2>&1
      echo "corrupt exit $?"; tail -2 "$OUT/corrupt.log" ;;
    online)
      rm -rf "$OUT/adapt-online"
      timeout "$(cap "${ONLINE_TIMEOUT:-300}")" $TTA adapt --ckpt "$CKPT" --data "$SETS" --severities 5 ${ONLINE_N:+--n "$ONLINE_N"} \
        --method source,ttt-online ${ONLINE_FLAGS:-} ${ADAPT_ARGS:-} --out "$OUT/adapt-online" > "$OUT/adapt-online.log" 2>&1
      echo "ttt-online exit $?"; tail -4 "$OUT/adapt-online.log" ;;
    ttt)
      rm -rf "$OUT/adapt-ttt"
      timeout "$(cap "${TTT_TIMEOUT:-200}")" $TTA adapt --ckpt "$CKPT" --data "$SETS" --severities 5 --n "${TTT_N:-1000}" \
        --method source,ttt ${TTT_FLAGS:-} ${ADAPT_ARGS:-} --out "$OUT/adapt-ttt" > "$OUT/adapt-ttt.log" 2>&1
      echo "ttt exit $?"; tail -4 "$OUT/adapt-ttt.log" ;;
    *) echo "unknown stage $stage (train, corrupt, online, ttt)"; exit 2 ;;
  esac
done

stamp table
$PYTHON benchmarks/masked_table.py "$CKPT" "$OUT" | tee "$OUT/table.md"

#!/usr/bin/env bash
# The headline speeds of two versions of tta in one GPU call, so a refactor can be checked against its 5% budget:
# the stream step (ResNet-26, explicit memory, fp32 compiled) and episodic TTT (bf16, compiled, chunk 512), one
# online stream and 15 streams side by side; first the CUDA tests of the current tree.
#
#   git archive <before-commit> tta_cli benchmarks | (mkdir -p .carry/before && tar x -C .carry/before)
#   bash benchmarks/speed_check.sh .carry/before     # results under $OUT (or speed-check/); CKPT= another GN checkpoint
#
# DEADLINE (seconds, default 560) caps every stage, so the call ends with what finished.
set -uo pipefail
BEFORE=$1 ROOT=$PWD OUT=${OUT:-speed-check} CKPT=${CKPT:-tta_cli/train/pretrained/resnet26_gn.rotation_sun2020_cifar10}
export PYTHONUNBUFFERED=1 TTA_CACHE_DIR=${TTA_CACHE_DIR:-/tmp/tta-cache}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); START=$(date +%s)
cap() { local l=$(( ${DEADLINE:-560} - ($(date +%s) - START) )); [ $l -lt $1 ] && echo $(( l > 1 ? l : 1 )) || echo $1; }
PYTHONPATH=$ROOT timeout "$(cap 180)" python3 -m pytest tests/test_adapt_cuda.py tests/test_adapt_online_parallel.py \
  tests/test_stream_loop.py tests/test_masked.py tests/test_triton_norm.py tests/test_triton_conv.py \
  "tests/test_corrupt.py::test_cuda_output_stays_on_cuda_and_deterministic_ones_match_cpu" \
  tests/test_augment.py::test_crop_flip_on_cuda_matches_reference_and_stays_on_device \
  tests/test_augment.py::test_loader_on_cuda_keeps_data_and_batches_on_the_gpu \
  -q -p no:cacheprovider -n 4 > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc $?" >> "$OUT/cuda-tests.log"
in_version() {  # in_version before|after LOG ARGS...: run a benchmark of that version's code
  local dir=$ROOT log=$2; [ "$1" = before ] && dir=$(cd "$BEFORE" && pwd); shift 2
  (cd "$dir" && PYTHONPATH=$dir timeout "$(cap 90)" python3 "$@" > "$OUT/$log" 2>&1)
}
for v in before after; do
  in_version $v stream-$v.log benchmarks/stream_speed.py --models resnet26 --modes explicit --frames 1500 --variants fp32:compile
done
for v in before after; do
  in_version $v adapt-$v.log benchmarks/adapt_speed.py --ckpt "$ROOT/$CKPT" --episodic-samples 1024 --online-samples 2000 \
    --reference-samples 0 --episodic bf16:compile:512 --online fp32:compile:graph-pipe-triton --parallel bf16:compile:15g
done
grep -h -E "frames/s|samples/s|^tta |^path|rc " "$OUT"/*.log

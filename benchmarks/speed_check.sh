#!/usr/bin/env bash
# The headline speeds of two versions of tta, each path run by both versions in the same GPU call, so a refactor
# can be checked against its 5% budget: the stream step (ResNet-26, explicit memory, fp32 compiled), one online
# stream (fp32 compiled, CUDA graph, pipelined, Triton), 15 streams side by side (bf16) and episodic TTT (bf16,
# compiled, chunk 512). PATHS=tests runs the current tree's tests that need CUDA (those skipped on a CPU) instead; they
# need a call of their own: each compiles, and together they take longer than 3 minutes under pytest-xdist.
#
#   git archive <before-commit> tta_cli benchmarks | (mkdir -p .carry/before && tar x -C .carry/before)
#   PATHS=tests bash benchmarks/speed_check.sh .carry/before                      # call 1
#   PATHS="stream online parallel" bash benchmarks/speed_check.sh .carry/before   # call 2; logs under $OUT (or speed-check/)
#   PATHS=episodic bash benchmarks/speed_check.sh .carry/before                   # call 3, with room for other work
#
# PATHS (default all four speed paths, more than one call holds) picks the runs; each version's run of a path has
# its own time limit (stream 55 s, online 90 s, parallel 135 s, episodic 150 s: every run compiles its paths and an
# online parity check first), cut to what is left of DEADLINE (default 560 s).
# CKPT: another GN checkpoint folder (default the packaged paper-recipe one).
set -uo pipefail
BEFORE=$1 ROOT=$PWD OUT=${OUT:-speed-check} CKPT=${CKPT:-tta_cli/train/pretrained/resnet26_gn.rotation_sun2020_cifar10}
export PYTHONUNBUFFERED=1 TTA_CACHE_DIR=${TTA_CACHE_DIR:-/tmp/tta-cache}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); START=$(date +%s)
cap() { local l=$(( ${DEADLINE:-560} - ($(date +%s) - START) )); [ $l -lt $1 ] && echo $(( l > 1 ? l : 1 )) || echo $1; }
in_version() {  # in_version before|after LIMIT LOG ARGS...: run a benchmark of that version's code
  local dir=$ROOT limit=$2 log=$3; [ "$1" = before ] && dir=$(cd "$BEFORE" && pwd); shift 3
  (cd "$dir" && PYTHONPATH=$dir timeout "$(cap "$limit")" python3 "$@" > "$OUT/$log" 2>&1)
}
ADAPT="benchmarks/adapt_speed.py --ckpt $ROOT/$CKPT --episodic-samples 1024 --online-samples 2000 --reference-samples 0"
for path in ${PATHS:-stream online parallel episodic}; do
  for v in before after; do
    case $path in
      tests)
        PYTHONPATH=$ROOT timeout "$(cap 600)" python3 -m pytest tests/test_adapt_cuda.py tests/test_triton_conv.py \
          tests/test_triton_norm.py::test_fused_norm_kernels_on_cuda_follow_torch \
          tests/test_corrupt.py::test_cuda_output_stays_on_cuda_and_deterministic_ones_match_cpu \
          tests/test_augment.py::test_crop_flip_on_cuda_matches_reference_and_stays_on_device \
          tests/test_augment.py::test_loader_on_cuda_keeps_data_and_batches_on_the_gpu \
          tests/test_masked.py::test_compiled_online_views_are_the_eager_views \
          tests/test_stream_loop.py::test_cuda_stream_overlapped_predictions_follow_the_plain_loop \
          tests/test_stream_loop.py::test_cuda_stream_with_triton_convolutions_follows_torch_convolutions \
          tests/test_stream_loop.py::test_cuda_stream_logs_every_frame_with_device_timing \
          -v -p no:cacheprovider -n 8 --durations 20 > "$OUT/cuda-tests.log" 2>&1
        echo "cuda tests rc $?" >> "$OUT/cuda-tests.log"; break ;;
      stream) in_version $v 55 stream-$v.log benchmarks/stream_speed.py --models resnet26 --modes explicit --frames 1500 --variants fp32:compile ;;
      online) in_version $v 90 online-$v.log $ADAPT --episodic= --parallel= --online fp32:compile:graph-pipe-triton ;;
      parallel) in_version $v 135 parallel-$v.log $ADAPT --episodic= --online= --parallel bf16:compile:15g ;;
      episodic) in_version $v 150 episodic-$v.log $ADAPT --online= --parallel= --episodic bf16:compile:512 ;;
      *) echo "unknown path $path (tests, stream, online, parallel, episodic)"; exit 2 ;;
    esac
  done
done
grep -H -E "frames/s|^tta |rc |passed|failed" "$OUT"/*.log

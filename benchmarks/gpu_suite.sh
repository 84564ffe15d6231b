#!/usr/bin/env bash
# The GPU runs behind the numbers in README/docs/results.md, in stages: bash benchmarks/gpu_suite.sh STAGE...
# Expects the CIFAR-10 JPEG archive at .carry/cifar10-jpeg.tar.gz (copy ../shared/data/cifar10-jpeg.tar.gz
# there) and writes logs under $WORK, bundled into $OUT/results.tgz after every stage (the device tool
# brings back at most 8 files). A checkpoint from an earlier call can travel as .carry/ckpt.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TTA_CACHE_DIR=$PWD/.work/tta-cache
# Work files and torch.compile's kernel cache live in the checkout's ignored .work/, which the device keeps between
# calls while the machine stays warm (a call made soon after the last one finds the corrupted sets and kernels there);
# the kernels can also come in as .carry/inductor.tgz, when an earlier call saved them (stage save-cache).
export TORCHINDUCTOR_CACHE_DIR=$PWD/.work/inductor-cache
# and the tta convolutions' own Triton kernels (@triton.jit, cached by Triton itself) inside it, so save-cache keeps both
export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/tta-triton
[ -f .carry/inductor.tgz ] && mkdir -p $TORCHINDUCTOR_CACHE_DIR && tar xzf .carry/inductor.tgz -C $TORCHINDUCTOR_CACHE_DIR
OUT=${OUT:-gpu-out}
WORK=${WORK:-$PWD/.work/tta-work}
ARCHIVE=.carry/cifar10-jpeg.tar.gz
CKPT=${CKPT:-.carry/ckpt}
mkdir -p "$OUT" "$WORK"; rm -f "$WORK"/bg-*.log
# DEADLINE (seconds from now) caps every stage's timeout, so the last stages end before the device call does
START=$(date +%s)
cap() { local left=$(( ${DEADLINE:-100000} - ($(date +%s) - START) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
TTA="python3 -m tta_cli.cli"
# train LOG LIMIT FALLBACK ARGS...: `tta train ARGS $TRAIN_ARGS`, timed, cut at LIMIT seconds (or the deadline), appended
# to LOG; on a failure other than the cut (say torch.compile), once more with the FALLBACK flags added after ARGS.
train() {
  local log=$1 limit=$2 fallback=$3; shift 3
  /usr/bin/time -f "train wall %e s" timeout "$(cap "$limit")" $TTA train "$@" ${TRAIN_ARGS:-} >> "$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    tail -20 "$log"; echo "retrying with $fallback"
    /usr/bin/time -f "train wall %e s" timeout "$(cap "$limit")" $TTA train "$@" ${TRAIN_ARGS:-} $fallback >> "$log" 2>&1
  fi
}
bundle() { tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.npy' --exclude='*.mp4' --exclude='resume.pt' --exclude='*.safetensors' . 2>/dev/null; }
run_stage() {
  local stage=$1
  echo "=== stage $stage ($(date +%T))"
  SECONDS=0
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
      python3 -c "import torch, timm, typer, rich, safetensors; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" ;;
    smoke)
      timeout "$(cap ${SMOKE_TIMEOUT:-400})" python3 -m pytest -q -x -p no:cacheprovider tests/test_augment.py tests/test_corrupt.py tests/test_adapt_episodic.py \
        tests/test_adapt_online.py tests/test_adapt_online_parallel.py tests/test_adapt_cuda.py tests/test_stream_loop.py tests/test_triton_conv.py 2>&1 | tail -15 ;;
    kernel-tests)
      # The CUDA tests of the Triton convolutions, the compiled step and the stream's graphs only (the smoke stage runs more)
      timeout "$(cap ${KERNEL_TESTS_TIMEOUT:-300})" python3 -m pytest -q -rf -p no:cacheprovider tests/test_adapt_cuda.py tests/test_stream_loop.py \
        -k "triton or overlapped or views or compiled_online or cuda_stream" 2>&1 | tail -15 ;;
    train-fast)
      # The fast recipe on the full archive; if it fails for another reason than the time limit, once more eagerly.
      : > "$WORK/train-fast.log"
      train "$WORK/train-fast.log" "${TRAIN_TIMEOUT:-400}" "--no-compile --force" \
        recipes/sun2020-rotation-gn-fast.yaml --data $ARCHIVE --out "$WORK/sun2020-fast"
      grep -E "^epoch|test|error|seconds" "$WORK/train-fast.log" | tail -25
      mkdir -p "$OUT/ckpt" && cp "$WORK"/sun2020-fast/model.* "$OUT/ckpt/" 2>/dev/null
      [ -f "$WORK/sun2020-fast/model.safetensors" ] || cp "$WORK/sun2020-fast/resume.pt" "$OUT/ckpt/" 2>/dev/null
      CKPT=$WORK/sun2020-fast ;;
    train-paper)
      # The paper's recipe (batch 128, 150 epochs), over several calls if need be: a call resumes from the
      # state an earlier one brought back as .carry/paper/resume.pt; each call returns its state in $OUT/paper.
      # PAPER_COMPILE_MODE (default reduce-overhead: forward and backward as CUDA graphs) for the launch-bound batch.
      dir=$WORK/sun2020; mkdir -p "$dir" "$OUT/paper"
      [ -f "$dir/resume.pt" ] || { [ -f .carry/paper/resume.pt ] && cp .carry/paper/resume.pt "$dir/"; }
      [ -f .carry/paper/train-paper.log ] && [ ! -f "$WORK/train-paper.log" ] && cp .carry/paper/train-paper.log "$WORK/"
      resume=$([ -f "$dir/resume.pt" ] && echo --resume)
      echo "--- call at $(date +%T) $resume" >> "$WORK/train-paper.log"
      train "$WORK/train-paper.log" "${TRAIN_TIMEOUT:-600}" "--force --set compile_mode=default" \
        recipes/sun2020-rotation-gn.yaml --data $ARCHIVE --out "$dir" $resume --set compile_mode=${PAPER_COMPILE_MODE:-reduce-overhead}
      grep -E "^epoch|test|error|seconds|wall|call at|resum" "$WORK/train-paper.log" | tail -30
      cp "$WORK/train-paper.log" "$dir"/resume.pt "$OUT/paper/" 2>/dev/null
      cp "$dir"/model.* "$OUT/paper/" 2>/dev/null
      [ -f "$dir/model.safetensors" ] && CKPT=$dir ;;
    train-bn)
      timeout "$(cap ${TRAIN_TIMEOUT:-300})" $TTA train recipes/sun2020-rotation-gn-fast.yaml --data $ARCHIVE --out "$WORK/sun2020-bn" \
        --set model.norm=bn ${TRAIN_BN_ARGS:-} > "$WORK/train-bn.log" 2>&1
      grep -E "^epoch|test|error|seconds" "$WORK/train-bn.log" | tail -12
      mkdir -p "$OUT/ckpt-bn" && cp "$WORK"/sun2020-bn/model.* "$OUT/ckpt-bn/" 2>/dev/null ;;
    corrupt)
      # All 15 corruptions x 5 severities of the 10,000 test images (750,000 images), timed end to end.
      grep -qs "corrupt wall" "$WORK/corrupt.log" && { echo "the sets are there from an earlier call"; return; }
      /usr/bin/time -f "corrupt wall %e s" $TTA corrupt --data $ARCHIVE --out "$WORK/cifar10-c" --seed 0 \
        --preview "$WORK/corrupt_preview.png" > "$WORK/corrupt.log" 2>&1
      tail -25 "$WORK/corrupt.log" ;;
    adapt:*|adapt)
      # adapt[:METHODS[:TAG[:EXTRA FLAGS]]], severity 5, ADAPT_N images of each corruption (default: all 10,000);
      # e.g. adapt:source,ttt-online:-online, or adapt:ttt-online:-paper-params:--params encoder+ssl (the paper's
      # choice of parameters). Separate stages are separate runs, so a run cut off by the deadline loses only itself.
      IFS=: read -r _ methods tag extra <<< "$stage"
      timeout "$(cap ${ADAPT_TIMEOUT:-600})" $TTA adapt --ckpt "$CKPT" --data "$WORK/cifar10-c" --severities 5 ${ADAPT_N:+--n $ADAPT_N} \
        --method "${methods:-source,ttt-online,ttt}" --out "$WORK/adapt$tag" --plot "$WORK/adapt$tag/errors.png" $extra \
        > "$WORK/adapt$tag.log" 2>&1
      tail -28 "$WORK/adapt$tag.log" ;;
    adapt-speed)
      timeout "$(cap ${ADAPT_SPEED_TIMEOUT:-400})" python3 benchmarks/adapt_speed.py $([ -d "$CKPT" ] && echo --ckpt "$CKPT") \
        ${ADAPT_SPEED_ARGS:---episodic-samples 1024 --online-samples 3000 --reference-samples 10} > "$WORK/adapt_speed.txt" 2>&1
      tail -16 "$WORK/adapt_speed.txt" ;;
    train-speed)
      python3 benchmarks/train_speed.py recipes/sun2020-rotation-gn.yaml --batch-sizes 128,512 --steps 40 > "$WORK/train_speed.txt" 2>&1
      tail -8 "$WORK/train_speed.txt" ;;
    corrupt-speed)
      python3 benchmarks/corrupt_speed.py --archive $ARCHIVE --device cuda > "$WORK/corrupt_speed.txt" 2>&1
      tail -24 "$WORK/corrupt_speed.txt" ;;
    stream-speed)
      timeout "$(cap ${STREAM_SPEED_TIMEOUT:-300})" python3 benchmarks/stream_speed.py ${STREAM_SPEED_ARGS:-} > "$WORK/stream_speed.txt" 2>&1
      tail -14 "$WORK/stream_speed.txt" ;;
    conv-speed)
      timeout "$(cap ${CONV_SPEED_TIMEOUT:-200})" python3 benchmarks/conv_speed.py ${CONV_SPEED_ARGS:-} > "$WORK/conv_speed.txt" 2>&1
      cat "$WORK/conv_speed.txt" | tail -60 ;;
    stream-make)
      # A labelled drifting stream of STREAM_FRAMES frames (default 20,000) from the test images (STREAM_MAKE_ARGS: more flags); frames.npy only where PyAV is missing (the device has none)
      timeout "$(cap ${STREAM_MAKE_TIMEOUT:-200})" $TTA stream make --data $ARCHIVE --out "$WORK/stream" --frames ${STREAM_FRAMES:-20000} \
        --corruptions all --device cuda $(python3 -c "import av" 2>/dev/null || echo --no-video) ${STREAM_MAKE_ARGS:-} > "$WORK/stream-make.log" 2>&1
      tail -6 "$WORK/stream-make.log" ;;
    stream-compare)
      # every mode, rollback off/on; SIGINT at the deadline ends the current run and still writes the finished ones
      timeout -s INT "$(cap ${STREAM_TIMEOUT:-600})" $TTA stream run "$WORK/stream" --ckpt "$CKPT" --compare --out "$WORK/stream-compare" \
        --plot "$WORK/stream-compare/timeline.png" ${STREAM_ARGS:-} > "$WORK/stream-compare.log" 2>&1
      tail -16 "$WORK/stream-compare.log" ;;
    save-cache)
      tar czf "$OUT/inductor.tgz" -C $TORCHINDUCTOR_CACHE_DIR . 2>/dev/null; ls -la "$OUT/inductor.tgz" ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "--- stage $stage took ${SECONDS}s"
  bundle
}
# bg:STAGE runs beside the stages after it (say the CUDA tests beside a launch-bound training run); its log
# is printed when the suite ends
for stage in "$@"; do
  if [[ $stage == bg:* ]]; then
    run_stage "${stage#bg:}" > "$WORK/bg-${stage#bg:}.log" 2>&1 &
  else
    run_stage "$stage"
  fi
done
wait
for log in "$WORK"/bg-*.log; do [ -f "$log" ] && { echo "=== background: $log"; cat "$log"; }; done
bundle

#!/usr/bin/env bash
# Test-time BatchNorm against the Tent paper's ratios (norm 0.42x, tent 0.35x source error at severity 5):
# trains BatchNorm ResNet-26s on the CIFAR-10 archive, makes CIFAR-10-C from its test images, and runs
# source / norm / tent on all 10,000 images of the 15 corruptions at severities 5 and 1, printing a table.
#
#   bash benchmarks/bn_protocol.sh ARCHIVE WORK [MODEL...]
#
# MODEL: supervised (recipes/supervised-bn.yaml: no self-supervised pass) or joint (recipes/rotation-bn-fast.yaml;
# also ttt-online at severity 5 unless ONLINE=0, and ttt on the first TTT_N images of each corruption, 0 to skip).
# Default: both.
# A model whose WORK/<model>/model.safetensors exists is not retrained. Needs a GPU for the timings quoted in docs.
set -uo pipefail
ARCHIVE=$1 WORK=$2; shift 2
MODELS=${*:-supervised joint}
TTT_N=${TTT_N:-1000}
TTA="python3 -m tta_cli.cli"
mkdir -p "$WORK"
[ -f "$WORK/cifar10-c/labels.npy" ] || /usr/bin/time -f "corrupt %e s" $TTA corrupt --data "$ARCHIVE" --out "$WORK/cifar10-c" --seed 0 > "$WORK/corrupt.log" 2>&1
rm -rf "$WORK"/adapt-*  # results of an earlier run are replaced
for model in $MODELS; do
  case $model in
    supervised) recipe=(recipes/supervised-bn.yaml); methods=source,norm,tent ;;
    joint) recipe=(recipes/rotation-bn-fast.yaml); methods=source,norm,tent ;;
    *) echo "unknown model $model"; exit 2 ;;
  esac
  if [ ! -f "$WORK/$model/model.safetensors" ]; then
    for compile in --compile --no-compile; do  # eagerly once more if compiling fails
      /usr/bin/time -f "train $model %e s" $TTA train "${recipe[@]}" $compile --data "$ARCHIVE" --out "$WORK/$model" --force \
        >> "$WORK/train-$model.log" 2>&1 && break
      tail -20 "$WORK/train-$model.log"
    done
    [ -f "$WORK/$model/model.safetensors" ] || continue
  fi
  grep -E "^epoch .*test acc" "$WORK/train-$model.log" | tail -1
  $TTA adapt --ckpt "$WORK/$model" --data "$WORK/cifar10-c" --severities 1,5 --method $methods --out "$WORK/adapt-$model" \
    > "$WORK/adapt-$model.log" 2>&1 || tail -20 "$WORK/adapt-$model.log"
  if [ "$model" = joint ] && [ "${ONLINE:-1}" != 0 ]; then
    $TTA adapt --ckpt "$WORK/$model" --data "$WORK/cifar10-c" --severities 5 --method source,ttt-online --out "$WORK/adapt-$model-online" \
      > "$WORK/adapt-$model-online.log" 2>&1 || tail -20 "$WORK/adapt-$model-online.log"
  fi
  if [ "$model" = joint ] && [ "$TTT_N" -gt 0 ]; then
    { $TTA adapt --ckpt "$WORK/$model" --data "$WORK/cifar10-c" --severities 5 --n "$TTT_N" --method source,ttt \
      --out "$WORK/adapt-$model-ttt" > "$WORK/adapt-$model-ttt.log" 2>&1 || tail -20 "$WORK/adapt-$model-ttt.log"; }
  fi
done
python3 - "$WORK" $MODELS <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print(f"{'model':<12}{'column':<16}{'mean error':>11}{'x source':>10}")
for model in sys.argv[2:]:
    for tag in ("", "-online", "-ttt"):
        path = work / f"adapt-{model}{tag}" / "results.json"
        if not path.is_file():
            continue
        means = json.loads(path.read_text())["table"]["mean"]
        for column, value in means.items():
            severity = column.split(" ")[-1] if " " in column else ""
            source = means.get(f"source {severity}".strip(), means.get("source"))
            print(f"{model + tag:<12}{column:<16}{value:>11.1f}{value / source:>10.2f}")
EOF

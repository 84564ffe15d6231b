#!/usr/bin/env bash
# Issue 23's table: error (%, mean over the corruptions) and samples/s of source, ttaug, ttt, ttt-nn, ttt with the
# adapted-weight cache, ttt and ttt-online with adapters, and ttt-online on the continual order with reset, rollback
# and the forgetting gate, next to per-corruption ttt-online. One `tta adapt` per row, logs and results under $WORK.
#
#   CKPT=runs/sun2020 DATA=../shared/data/cifar10-jpeg.tar.gz bash benchmarks/ideas_table.sh
#
# CKPT: a GN paper-recipe checkpoint (recipes/sun2020-rotation-gn.yaml). DATA: the clean CIFAR-10 source to corrupt
# (severity 5, on the device) or a CIFAR-10-C folder. TRAIN_DATA: ttt-nn's training images when the checkpoint's
# recorded data.source is not reachable from here. N: images per set (all when unset). CORRUPTIONS (all), TAU (the
# cache's cosine threshold, 0.99), FORGET (the decay per step, 0.01), EXTRA (flags added to every run, e.g.
# "--device cpu --steps 1 --copies 2" for a smoke test), WORK (runs/ideas-table), PYTHON (python3), DEADLINE (seconds
# for all rows: a row is cut at it and later rows are skipped; the table of the finished rows is printed anyway),
# ROWS (the names of the rows to run, in that order, e.g. "continual continual-forget"; all when unset), STREAM (a `tta stream make`
# folder: two more rows, ttt and ttt with the cache on its frames in order, which is what the cache is for).
set -uo pipefail
CKPT=${CKPT:?set CKPT to a tta train checkpoint folder}
DATA=${DATA:-cifar10}
WORK=${WORK:-runs/ideas-table}
TAU=${TAU:-0.99}
FORGET=${FORGET:-0.01}
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$WORK"
PYTHON=${PYTHON:-python3}
ADAPT=("$PYTHON" -m tta_cli.cli adapt --ckpt "$CKPT" --force)
SETS=(--data "$DATA" --corruptions "${CORRUPTIONS:-all}" --severities 5)  # the corrupted rows' data
[ -n "${N:-}" ] && ADAPT+=(--n "$N")
NN=(); [ -n "${TRAIN_DATA:-}" ] && NN=(--set "ttt-nn.train_data=$TRAIN_DATA")

# row NAME ARGS...: one `tta adapt` into $WORK/NAME (its log beside it); a failure is reported and the table goes on.
# The stream rows read $STREAM instead of the corrupted sets.
row() {
  local name=$1 left=$(( ${DEADLINE:-864000} - SECONDS )); shift
  local sets=("${SETS[@]}"); [[ $name == stream-* ]] && sets=(--data "$STREAM")
  [ $left -gt 5 ] || { echo "[$(date +%T)] $name: skipped, past DEADLINE"; return; }
  echo "[$(date +%T)] $name: ${*}"
  timeout $left "${ADAPT[@]}" "${sets[@]}" "$@" ${EXTRA:-} --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || echo "  failed (exit $rc): $(tail -1 "$WORK/$name.log")"
}
declare -A FLAGS; NAMES=()
define() { local name=$1; shift; FLAGS[$name]=$(printf '%q ' "$@"); NAMES+=("$name"); }  # a row's flags, quoted for eval
define source --method source
define ttaug --method ttaug
define ttt --method ttt
define ttt-nn --method ttt-nn "${NN[@]}"
define ttt-cache --method ttt --set "ttt.cache=$TAU"
define ttt-adapters --method ttt --params adapters
define online --method ttt-online
define online-adapters --method ttt-online --params adapters
define continual --method ttt-online --order continual
define continual-reset --method ttt-online --order continual --reset on-shift
define continual-rollback --method ttt-online --order continual --rollback
define continual-forget --method ttt-online --order continual --forget "$FORGET"
define continual-forget-momentum --method ttt-online --order continual --forget "$FORGET" --set momentum=0.9 --lr 0.0001
if [ -n "${STREAM:-}" ]; then
  define stream-ttt --method ttt
  define stream-ttt-cache --method ttt --set "ttt.cache=$TAU"
fi
for name in ${ROWS:-${NAMES[*]}}; do  # in the order ROWS lists them
  [ -n "${FLAGS[$name]+set}" ] || { echo "no row $name (rows: ${NAMES[*]}; the stream rows need STREAM)"; continue; }
  eval "row $name ${FLAGS[$name]}"
done

"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
print(f"\n{'row':<27}{'error %':>9}{'samples/s':>11}{'steady':>9}  notes")
for folder in sorted((p for p in work.iterdir() if (p / "results.json").is_file()), key=lambda p: p.stat().st_mtime):
    results = json.loads((folder / "results.json").read_text())
    (method, speed), = results["methods"].items()
    settings = results["settings"]
    notes = [f"order {settings['order']}"] if settings["order"] != "per-corruption" else []
    notes += ["a tta stream make stream"] if results["rows"][0]["corruption"] == "stream" else []
    notes += [f"params {settings['params']}"] if settings["params"] != "encoder" and method.startswith("ttt") else []
    if "cache_hit_rate" in speed:
        notes.append(f"cache hit rate {speed['cache_hit_rate']:.1%} (tau {settings['ttt']['cache']})")
    notes += [f"{key} {value}" for key, value in speed["counters"].items() if value and key in ("resets", "rollbacks")]
    error = results["table"]["mean"][method]
    steady = speed.get("steady_samples_per_s")  # after the first batch, which compiles
    print(f"{folder.name:<27}{error:>9.2f}{speed['samples_per_s']:>11,.0f}{steady or float('nan'):>9,.0f}  {', '.join(notes)}")
PY

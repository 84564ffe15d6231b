#!/usr/bin/env bash
# Issue 18's protocol tables: every method that applies to a checkpoint, CIFAR-10-C severity 5, `--seeds 3`, in the
# orders per-corruption (reset between sets) and continual (15 sets in a row, no reset), and correlated (Dirichlet
# label order, reset between sets) for the methods that claim to handle it. Prints markdown tables and bundles
# everything into $OUT as three files: protocol.tgz (each call's results.json/csv and log), tables.md, summary.json.
#
#   DEADLINE=570 OUT=gpu-out bash benchmarks/protocol_tables.sh CORRUPTED ARCHIVE CKPT [CKPT...]
#
# CORRUPTED: a `tta corrupt` folder; made from ARCHIVE (the clean CIFAR-10 archive) when it has no labels.npy yet.
# CKPT: a `tta train` folder or .safetensors; BatchNorm (model.norm=bn in its model.yaml) or GroupNorm.
# DEADLINE (s, from the start) caps every call with `timeout`, so the script ends before it; each checkpoint gets an
# equal part of what is left, and a call that is cut loses only its own results (the earlier ones stay in $OUT).
# Knobs: SEEDS (3), CORRUPTIONS (all), DIRICHLET (0.1: the correlated order's D), DEVICE (auto), N_MAX (10000),
# N_MIN (20), EXTRA (added to every `tta adapt` call, e.g. "--set memo.copies=4"), WORK (.work/protocol), PYTHON,
# PLAN=1 (print each stage's methods, n and seconds, run nothing).
#
# Methods and stages. Applicable: GroupNorm: source memo eata sar cotta ttt ttt-online (norm and tent need BatchNorm);
# BatchNorm: source norm tent memo eata sar cotta ttt-online (episodic ttt on BatchNorm takes torch's slow per-sample
# fallback: left out). Continual: the online methods only (memo and ttt are episodic: their errors do not depend on
# the order). Correlated: sar (SAR's claim: online label shifts), with norm and tent on BatchNorm as the references
# that the literature shows failing there. Every call also runs source, so each method has its source error on the
# same first n images of every set.
#
# Time estimates (H200; samples/s over a whole table). Measured: source ~90k, norm ~50k, tent ~20k
# (docs/results.md), ttt-online ~1.3k with the 15 per-corruption streams side by side and ~700 as one stream
# (continual; docs/results.md, one-stream row), episodic ttt ~350-400 on GroupNorm (docs/results.md, speed-notes.md).
# Not measured, estimated from each method's passes per sample against tent's one forward+backward at ~20k/s:
#   eata  ~10k: tent's pass at a smaller batch (64), plus one pass over the Fisher's first 2000 samples
#   sar   ~5k:  two forward+backward passes per batch of 64 (SAM)
#   cotta ~1.2k: student forward+backward, anchor and teacher forwards, and 32 augmented teacher forwards on a
#               severity-5 batch (the source is rarely 92% confident there): ~12 forward+backward equivalents
#   memo  ~40:  per image one forward+backward over 32 AugMix views and one prediction, eager, one image at a time
#               (like the eager online TTT step on 32 views: 48 samples/s, docs/adapt_speed.txt)
# Each stage gets SHARE seconds of a 570-second call (scaled to the checkpoint's part of DEADLINE); its --n is
# rate x (seconds - 15 s start-up, - 30 s compile for ttt/ttt-online) / (sets x seeds), the rate combining the
# stage's methods. At DEADLINE=570 with one GroupNorm checkpoint (PLAN=1 prints this): per corruption and seed,
# per-corruption n = 2,357 (eata, sar), 999 (cotta), 484 (ttt-online), 142 (ttt), 50 (memo); continual 1,642
# (eata, sar), 868 (cotta), 339 (ttt-online); correlated 1,894 (sar); 483 of the 549 s planned. A BatchNorm one:
# 1,924 for the per-corruption stage that adds norm and tent, no ttt stage. The measured samples/s land in
# summary.json and tables.md: correct RATE below from them.
set -uo pipefail
[ $# -ge 3 ] || { sed -n 2,8p "$0"; exit 2; }
CORRUPTED=$1 ARCHIVE=$2; shift 2
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
TTA="$PYTHON -m tta_cli.cli"
OUT=${OUT:-gpu-out} WORK=${WORK:-$PWD/.work/protocol}
SEEDS=${SEEDS:-3} CORRUPTIONS=${CORRUPTIONS:-all} DIRICHLET=${DIRICHLET:-0.1} DEVICE=${DEVICE:-auto}
N_MAX=${N_MAX:-10000} N_MIN=${N_MIN:-20} DEADLINE=${DEADLINE:-570}
START=$(date +%s) RESERVE=20  # seconds kept at the end for the tables and the bundle
mkdir -p "$OUT" "$WORK"
declare -A RATE=([source]=90000 [norm]=50000 [tent]=20000 [eata]=10000 [sar]=5000 [cotta]=1200 [memo]=40 [ttt]=380
                 [ttt-online]=1300 [ttt-online-continual]=700)
# stage  order  share(s of 570)  methods on GroupNorm  methods on BatchNorm ("-": not run)
STAGES="
pc-fast      per-corruption 50 source,eata,sar  source,norm,tent,eata,sar
pc-cotta     per-corruption 55 source,cotta     source,cotta
pc-online    per-corruption 65 source,ttt-online source,ttt-online
pc-ttt       per-corruption 65 source,ttt       -
pc-memo      per-corruption 75 source,memo      source,memo
ct-fast      continual      40 source,eata,sar  source,norm,tent,eata,sar
ct-cotta     continual      50 source,cotta     source,cotta
ct-online    continual      70 source,ttt-online source,ttt-online
correlated   correlated     35 source,sar       source,norm,tent,sar
"

left() { echo $(( DEADLINE - ($(date +%s) - START) - RESERVE )); }
cap() {  # LIMIT [END]: LIMIT, or less so as to end before DEADLINE (and before the epoch second END if given)
  local rest; rest=$(left); [ $# -gt 1 ] && [ $(( $2 - $(date +%s) )) -lt "$rest" ] && rest=$(( $2 - $(date +%s) ))
  [ "$rest" -lt "$1" ] && echo $(( rest > 1 ? rest : 1 )) || echo "$1"
}
sets() { [ "$CORRUPTIONS" = all ] && echo 15 || echo $(( $(tr -cd , <<< "$CORRUPTIONS" | wc -c) + 1 )); }
norm_of() {  # bn or gn, from the checkpoint's model.yaml
  local folder=$1; [ -f "$folder" ] && folder=$(dirname "$folder")
  grep -m1 -E '^ +norm: ' "$folder/model.yaml" 2>/dev/null | awk '{print $2}'
}
stage_n() {  # METHODS ORDER SECONDS -> --n for that many seconds of the stage's methods
  local methods=$1 order=$2 seconds=$3 rates="" method
  for method in ${methods//,/ }; do
    [ "$method" = ttt-online ] && [ "$order" = continual ] && method=ttt-online-continual
    rates+=" ${RATE[$method]}"
  done
  awk -v s="$seconds" -v sets="$(sets)" -v seeds="$SEEDS" -v lo="$N_MIN" -v hi="$N_MAX" -v m="$methods" -v r="$rates" 'BEGIN {
    split(r, rate, " "); inverse = 0; for (i in rate) inverse += 1 / rate[i]
    busy = s - 15 - (m ~ /ttt/ ? 30 : 0); n = int(busy / inverse / (sets * seeds))
    print (n < lo ? lo : (n > hi ? hi : n)) }'
}
bundle() {
  tar czf "$OUT/protocol.tgz" -C "$WORK" --exclude='predictions.csv' . 2>/dev/null
  "$PYTHON" - "$WORK" "$OUT" "$DIRICHLET" <<'EOF' > "$OUT/tables.md"
import json, sys
from pathlib import Path
work, out, dirichlet = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
summary = {}
for path in sorted(work.glob("*/*/results.json")):
    checkpoint, stage = path.parent.parent.name, path.parent.name
    results = json.loads(path.read_text())
    table, order = results["table"], results["settings"].get("order", "per-corruption")
    for method, mean in table["mean"].items():
        summary.setdefault(checkpoint, {}).setdefault(order, {})[method if method != "source" else f"source@{stage}"] = {
            "stage": stage, "n": results["selection"].get("n"), "mean": mean, "std": table.get("mean_std", {}).get(method, 0.0),
            "source": table["mean"]["source"], "samples_per_s": results["methods"][method]["samples_per_s"],
            "per_corruption": dict(zip(table["corruptions"], table["errors"][method])),
        }
(out / "summary.json").write_text(json.dumps(summary, indent=1))
orders = ("per-corruption", "continual", "correlated")
for checkpoint, by_order in summary.items():
    print(f"\n### {checkpoint}: mean error (%) over the corruptions, severity 5, mean ± std over seeds "
          f"(x its source error on the same n images; n per corruption)\n")
    print("| method | " + " | ".join(o if o != "correlated" else f"correlated (D={dirichlet})" for o in orders) + " |")
    print("| --- |" + " ---: |" * len(orders))
    methods = dict.fromkeys(m for o in orders for m in by_order.get(o, {}) if not m.startswith("source@"))
    sources = {o: [v for m, v in by_order.get(o, {}).items() if m.startswith("source@")] for o in orders}
    for method in ["source", *methods]:
        cells = []
        for order in orders:
            if method == "source":
                best = max(sources[order], key=lambda v: v["n"] or 0, default=None)
                cells.append(f"{best['mean']:.1f} (n={best['n']})" if best else "")
                continue
            cell = by_order.get(order, {}).get(method)
            cells.append("" if cell is None else f"{cell['mean']:.1f} ± {cell['std']:.1f} ({cell['mean'] / max(cell['source'], 1e-9):.2f}x, n={cell['n']})")
        print(f"| {method} | " + " | ".join(cells) + " |")
    per = {m: v for m, v in by_order.get("per-corruption", {}).items() if not m.startswith("source@")}
    if per:
        corruptions = list(next(iter(per.values()))["per_corruption"])
        print(f"\nper-corruption order, error per corruption (its source on the same images in brackets):\n")
        print("| corruption | " + " | ".join(per) + " |")
        print("| --- |" + " ---: |" * len(per))
        for corruption in corruptions:
            cells = []
            for method, cell in per.items():
                source = by_order["per-corruption"][f"source@{cell['stage']}"]["per_corruption"][corruption]
                cells.append(f"{cell['per_corruption'][corruption]:.1f} ({source:.1f})")
            print(f"| {corruption} | " + " | ".join(cells) + " |")
    speeds = {f"{m.split('@')[0]} {o}": v["samples_per_s"] for o in orders for m, v in by_order.get(o, {}).items()}
    print("\nsamples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items()))
EOF
}

[ -f "$CORRUPTED/labels.npy" ] || [ "${PLAN:-0}" = 1 ] || timeout "$(cap 240)" $TTA corrupt --data "$ARCHIVE" --out "$CORRUPTED" --device "$DEVICE" \
  > "$WORK/corrupt.log" 2>&1 || { tail -5 "$WORK/corrupt.log"; echo "no corrupted set"; exit 1; }
checkpoints_left=$#
for ckpt in "$@"; do
  tag=$(basename "${ckpt%/}" .safetensors); [ "$tag" = model ] && tag=$(basename "$(dirname "$ckpt")")
  norm=$(norm_of "$ckpt"); column=4; [ "$norm" = bn ] && column=5
  scale=$(awk -v left="$(left)" -v k="$checkpoints_left" 'BEGIN { print left / k / 570 }')
  ckpt_end=$(( $(date +%s) + $(left) / checkpoints_left ))  # its part of the time: no checkpoint starves the next
  echo "=== $tag ($norm): $(left) s left, this checkpoint's scale $scale"
  mkdir -p "$WORK/$tag"
  while read -r stage order share gn_methods bn_methods; do
    [ -n "$stage" ] || continue
    methods=$gn_methods; [ $column = 5 ] && methods=$bn_methods
    [ "$methods" = - ] && continue
    seconds=$(awk -v s="$share" -v k="$scale" 'BEGIN { print int(s * k) }')
    n=$(stage_n "$methods" "$order" "$seconds")
    if [ "${PLAN:-0}" = 1 ]; then echo "$stage: $methods, $order, n $n, $seconds s"; continue; fi
    limit=$(cap $(( seconds * 3 / 2 + 30 )) "$ckpt_end")
    [ "$limit" -gt 5 ] || { echo "$stage: no time left"; continue; }
    extra=(); [ "$order" = correlated ] && extra=(--dirichlet "$DIRICHLET")
    SECONDS=0
    timeout "$limit" $TTA adapt --ckpt "$ckpt" --data "$CORRUPTED" --corruptions "$CORRUPTIONS" --severities 5 --n "$n" \
      --method "$methods" --order "$order" "${extra[@]}" --seeds "$SEEDS" --device "$DEVICE" --out "$WORK/$tag/$stage" --force \
      ${EXTRA:-} > "$WORK/$tag/$stage.log" 2>&1
    rc=$?
    echo "$stage: $methods, $order, n $n, ${SECONDS} s of ${seconds} planned (cut at $limit), exit $rc"
    [ $rc -eq 0 ] || tail -3 "$WORK/$tag/$stage.log"
    bundle
  done <<< "$STAGES"
  checkpoints_left=$(( checkpoints_left - 1 ))
done
[ "${PLAN:-0}" = 1 ] && exit 0
bundle
cat "$OUT/tables.md"

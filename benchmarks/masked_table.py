"""The table of benchmarks/masked_gpu.sh: a masked checkpoint's clean accuracy and training speed, and the severity-5
mean error of source / ttt-online (all images) and source / ttt (the first TTT_N per corruption), with samples/s.

    python benchmarks/masked_table.py CKPT OUT     (prints markdown; writes OUT/table.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def checkpoint_row(ckpt: Path) -> dict:
    meta_path = ckpt / "model.yaml"
    if not meta_path.is_file():
        return {}
    meta = yaml.safe_load(meta_path.read_text())
    metrics = meta.get("metrics", {})
    keys = ("test_acc", "epoch", "train_seconds", "train_images_per_s", "test_ssl_mse")
    return {key: metrics[key] for key in keys if key in metrics}


def adapt_rows(results_path: Path) -> list[dict]:
    """One row per method: mean error over the corruptions, samples per corruption, samples/s."""
    if not results_path.is_file():
        return []
    results = json.loads(results_path.read_text())
    corruptions = len(results["table"]["corruptions"])
    rows = []
    for method, mean_error in results["table"]["mean"].items():
        run = results["methods"][method]
        rows.append({"method": method, "mean_error": mean_error, "corruptions": corruptions,
                     "images_per_corruption": run["samples"] // max(corruptions, 1), "samples_per_s": run["samples_per_s"]})
    source = next((row["mean_error"] for row in rows if row["method"] == "source"), None)
    for row in rows:
        row["x_source"] = row["mean_error"] / source if source else None
    return rows


def main(ckpt: Path, out: Path) -> None:
    trained = checkpoint_row(ckpt)
    runs = {name: adapt_rows(out / f"adapt-{name}" / "results.json") for name in ("online", "ttt")}
    (out / "table.json").write_text(json.dumps({"checkpoint": str(ckpt), "trained": trained, "runs": runs}, indent=1))
    if trained:
        print(f"checkpoint {ckpt}: clean accuracy {100 * trained['test_acc']:.1f}% after {trained.get('epoch')} epochs, "
              f"{trained.get('train_seconds', 0):.0f} s, {trained.get('train_images_per_s', 0):,.0f} clean images/s\n")
    print("| run | method | corruptions | images each | mean error (%) | x source | samples/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in runs.items():
        for row in rows:
            ratio = "" if row["x_source"] is None else f"{row['x_source']:.2f}"
            print(f"| {name} | {row['method']} | {row['corruptions']} | {row['images_per_corruption']} | {row['mean_error']:.1f} | "
                  f"{ratio} | {row['samples_per_s']:,.0f} |")
        if not rows:
            print(f"| {name} | (no results: see adapt-{name}.log) | | | | | |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

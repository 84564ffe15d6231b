"""The published comparators through `tta adapt`: listed in the help, run end to end, described in results.json."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPARATORS = ("memo", "eata", "sar", "cotta")


def test_comparators_are_listed_in_adapt_help():
    listing = run_cli(["adapt", "--help"]).stdout
    assert all(f"{name} " in listing for name in COMPARATORS)


def test_comparators_run_end_to_end_and_describe_themselves_in_results(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog", "--method", ",".join(COMPARATORS),
        "--n", "20", "--device", "cpu", "--set", "memo.copies=4", "--set", "cotta.augmentations=2",
        "--set", "eata.fisher_samples=10", "--set", "eata.batch=10", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    for name in COMPARATORS:
        assert results["methods"][name]["samples"] == 20
        assert 0.0 <= results["table"]["mean"][name] <= 100.0
        assert results["semantics"][name]["computes"] and results["semantics"][name]["updates"]
    assert results["settings"]["memo"]["copies"] == 4 and results["settings"]["sar"]["rho"] == 0.05
    assert set(results["methods"]["eata"]["counters"]) == {"reliable_samples", "updated_samples"}
    assert set(results["methods"]["sar"]["counters"]) == {"reliable_samples", "recoveries"}


@pytest.mark.parametrize("setting", ["memo.copies=0", "eata.e_margin=-0.4", "eata.d_margin=-0.1", "sar.reset_constant=-1",
                                     "sar.rho=-0.05", "cotta.anchor_threshold=-0.1", "cotta.restore_probability=1.5"])
def test_a_bad_comparator_setting_is_one_line_before_any_work(tiny_checkpoint, tmp_path, setting):
    method = setting.split(".")[0]
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--method", method, "--n", "20", "--device", "cpu",
                      "--set", setting, "--out", tmp_path / "adapt"])
    assert result.exit_code == 2, result.output
    assert setting.split("=")[0] in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "adapt").exists()

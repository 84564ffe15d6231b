"""Each method's error difference to source, paired per sample, with its 95% interval (tta_cli/adapt/paired.py)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import run_cli

from tta_cli.adapt.paired import Z_95, mean_over_sets, paired_difference


def test_paired_difference_matches_a_hand_computation():
    method = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0])
    source = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    # d = (0, -1, -1, 1, -1, 0, 0, 0): mean -1/4; squared deviations sum to 3.5, so sd = sqrt(3.5 / 7) = sqrt(0.5)
    # and the standard error sqrt(0.5) / sqrt(8) = 1/4: in points, -25 +- 1.96 * 25
    difference = paired_difference(method, source)
    assert difference.points == pytest.approx(-25.0)
    assert difference.half_width == pytest.approx(Z_95 * 25.0)
    assert (difference.low, difference.high, difference.n) == (pytest.approx(-25.0 - Z_95 * 25), pytest.approx(-25.0 + Z_95 * 25), 8)


def test_identical_predictions_differ_by_zero_with_a_zero_interval():
    wrong = torch.tensor([1, 0, 1, 1, 0])
    assert paired_difference(wrong, wrong).record() == {"points": 0.0, "half_width": 0.0, "n": 5, "low": 0.0, "high": 0.0}


def test_samples_a_run_did_not_visit_are_left_out():
    method = torch.tensor([0.0, float("nan"), 1.0])
    source = torch.tensor([1.0, 1.0, 1.0])
    difference = paired_difference(method, source)
    assert difference.n == 2 and difference.points == pytest.approx(-50.0)


def test_the_mean_over_sets_averages_and_adds_the_standard_errors_in_quadrature():
    first = paired_difference(torch.tensor([1, 0, 0, 1, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 0, 1, 0, 0, 0]))  # -25, SE 25
    second = paired_difference(torch.zeros(4), torch.zeros(4))  # 0, SE 0
    both = mean_over_sets([first, second])
    assert both.points == pytest.approx(-12.5) and both.half_width == pytest.approx(Z_95 * 12.5) and both.n == 12


def test_adapt_reports_the_paired_difference_that_its_predictions_give(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", tiny_checkpoint, "--corruptions", "gaussian_noise", "--n", "30", "--method", "source,ttt-online",
                      "--lr", "0.01", "--device", "cpu", "--predictions", "--out", out])
    assert result.exit_code == 0, result.output
    assert "ttt-online vs source" in result.output and "95% interval" in result.output
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wrong = {name: torch.tensor([float(row[name] != row["label"]) for row in rows]) for name in ("source", "ttt-online")}
    expected = paired_difference(wrong["ttt-online"], wrong["source"])
    with open(out / "results.csv", newline="") as handle:
        online = next(row for row in csv.DictReader(handle) if row["method"] == "ttt-online")
    assert float(online["vs_source"]) == pytest.approx(expected.points, abs=1e-3)
    assert float(online["vs_source_low"]) == pytest.approx(expected.low, abs=1e-3)
    assert float(online["vs_source_high"]) == pytest.approx(expected.high, abs=1e-3)

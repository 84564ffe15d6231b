"""A method's error difference to `source`, paired per sample, with a 95% interval (normal approximation).

For sample i of a set, d_i = wrong_method(i) - wrong_source(i), in {-1, 0, 1} (with --seeds K, the method's
wrongness is averaged over the K runs first). The difference is 100 * mean(d) points (negative: fewer errors) and
its 95% interval mean(d) +- 1.96 * sd(d) / sqrt(n), sd with n - 1: pairing cancels how hard each sample is for both,
so the interval is far narrower than one from the two errors apart. A mean over sets (the table's mean row) averages
the sets' differences; the sets are independent samples, so its standard error is sqrt(sum of squared SEs) / K.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class PairedDifference:
    points: float  # mean error difference to source, in points
    half_width: float  # of the 95% interval, in points
    n: int  # samples (pairs)

    @property
    def low(self) -> float:
        return self.points - self.half_width

    @property
    def high(self) -> float:
        return self.points + self.half_width

    @property
    def standard_error(self) -> float:
        return self.half_width / Z_95

    def record(self) -> dict[str, float | int]:
        return {**asdict(self), "low": self.low, "high": self.high}


def paired_difference(wrong: torch.Tensor, baseline_wrong: torch.Tensor) -> PairedDifference:
    """`wrong`, `baseline_wrong`: (n,) per-sample error indicators (or their means over seeds) of a method and of
    the baseline on the same samples in the same order; NaN marks a sample a run did not visit (left out)."""
    differences = 100.0 * (wrong.double() - baseline_wrong.double())
    differences = differences[differences.isfinite()]
    n = len(differences)
    if n == 0:
        return PairedDifference(0.0, 0.0, 0)
    sd = float(differences.std(correction=1)) if n > 1 else 0.0
    return PairedDifference(float(differences.mean()), Z_95 * sd / math.sqrt(n), n)


def mean_over_sets(parts: list[PairedDifference]) -> PairedDifference:
    """The mean of independent sets' differences, with its interval (see the module doc)."""
    count = len(parts)
    standard_error = math.sqrt(sum(part.standard_error**2 for part in parts)) / count
    return PairedDifference(sum(part.points for part in parts) / count, Z_95 * standard_error, sum(part.n for part in parts))

"""Stream orders: in which order test samples reach an adaptation method, and where it resets.

Every order is a list of segments over one global index (all chosen sets concatenated); the
method is reset to the source weights before each segment. Seeded, so orders are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tta_cli.data.imageset import ImageSet
from tta_cli.errors import TTAError

ORDERS = ("per-corruption", "continual", "gradual", "mixed", "correlated")
ORDER_SEMANTICS = "per-corruption resets between sets; continual/gradual/mixed never reset; correlated resets between sets"


@dataclass
class Segment:
    """Global sample indices (into the concatenation of all sets) adapted in a row after a reset."""

    indices: torch.Tensor
    label: str


def set_offsets(sets: list[ImageSet]) -> list[int]:
    offsets, total = [], 0
    for image_set in sets:
        offsets.append(total)
        total += len(image_set)
    return offsets


def build_order(sets: list[ImageSet], order: str, seed: int = 0, dirichlet: float | None = None) -> list[Segment]:
    """per-corruption: each set alone, reset between (default). continual: all sets in a row, never reset.
    gradual: per corruption, severities 1->5->1 in consecutive chunks of its images, all corruptions in
    a row, never reset. mixed: every sample of every set shuffled together. correlated: per set with a
    reset, samples sorted by label, or with `dirichlet` D non-i.i.d. class slots (small D = more correlated)."""
    if order not in ORDERS:
        raise TTAError(f"unknown order {order!r}; choose one of: {', '.join(ORDERS)}")
    generator = torch.Generator().manual_seed(seed)
    offsets = set_offsets(sets)
    ranges = [torch.arange(len(s)) + o for s, o in zip(sets, offsets, strict=True)]
    names = [set_name(s) for s in sets]
    if order == "per-corruption":
        return [Segment(r, n) for r, n in zip(ranges, names, strict=True)]
    if order == "continual":
        return [Segment(torch.cat(ranges), "continual")]
    if order == "mixed":
        everything = torch.cat(ranges)
        return [Segment(everything[torch.randperm(len(everything), generator=generator)], "mixed")]
    if order == "gradual":
        return [Segment(gradual_indices(sets, offsets), "gradual")]
    segments = []
    for image_set, offset, name in zip(sets, offsets, names, strict=True):
        labels = image_set.labels.cpu()
        if dirichlet is None:
            shuffled = torch.randperm(len(labels), generator=generator)
            local = shuffled[torch.argsort(labels[shuffled], stable=True)]
        else:
            local = dirichlet_order(labels, dirichlet, generator)
        segments.append(Segment(local + offset, name))
    return segments


def set_name(image_set: ImageSet) -> str:
    meta = image_set.meta
    if "corruption" in meta:
        return f"{meta['corruption']}-{meta.get('severity', '')}".rstrip("-")
    return str(meta.get("name", "set"))


def gradual_indices(sets: list[ImageSet], offsets: list[int]) -> torch.Tensor:
    """For each corruption (in the sets' order): severities ascending then descending (1..5..1), each
    severity's chunk taken from consecutive sample positions of that severity's set."""
    by_corruption: dict[str, dict[int, int]] = {}
    for position, image_set in enumerate(sets):
        corruption = image_set.meta.get("corruption")
        severity = image_set.meta.get("severity")
        if corruption is None or severity is None:
            raise TTAError("order `gradual` needs shifted sets with corruption and severity (e.g. from `tta corrupt`)")
        by_corruption.setdefault(corruption, {})[int(severity)] = position
    pieces = []
    for severities in by_corruption.values():
        ladder = sorted(severities)
        schedule = ladder + ladder[-2::-1]
        size = min(len(sets[p]) for p in severities.values())
        bounds = torch.linspace(0, size, len(schedule) + 1).long()
        for step, severity in enumerate(schedule):
            position = severities[severity]
            pieces.append(torch.arange(int(bounds[step]), int(bounds[step + 1])) + offsets[position])
    return torch.cat(pieces)


def dirichlet_order(labels: torch.Tensor, concentration: float, generator: torch.Generator) -> torch.Tensor:
    """Non-i.i.d. order as in NOTE/RoTTA: split each class's samples over C time slots with Dirichlet(D)
    proportions, then play the slots in turn (each slot shuffled)."""
    if concentration <= 0:
        raise TTAError(f"--dirichlet must be positive, got {concentration}")
    classes = int(labels.max()) + 1
    slots: list[list[torch.Tensor]] = [[] for _ in range(classes)]
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    for label in range(classes):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        proportions = torch.from_numpy(rng.dirichlet(np.full(classes, float(concentration))))
        cuts = (proportions.cumsum(0) * len(members)).round().long().clamp(max=len(members))
        start = 0
        for slot, end in enumerate(cuts.tolist()):
            slots[slot].append(members[start:end])
            start = end
    order = []
    for pieces in slots:
        slot = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
        order.append(slot[torch.randperm(len(slot), generator=generator)])
    return torch.cat(order)

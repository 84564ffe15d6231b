"""Run one adaptation method over a stream of test sets and score it per set."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tta_cli.adapt.orders import Segment, set_offsets
from tta_cli.data.imageset import ImageSet, to_float_nchw


@dataclass
class RunResult:
    """errors[i] is the error (%) on sets[i]; predictions (N_total,) in the sets' concatenated order."""

    method: str
    errors: list[float]
    predictions: torch.Tensor
    seconds: float
    samples: int
    counters: dict


def run_method(
    method,
    sets: list[ImageSet],
    segments: list[Segment],
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] = lambda done: None,
) -> RunResult:
    """Feed `segments` to `method` in batches; uint8 images live on the device, predictions too."""
    images = torch.cat([s.images for s in sets]).to(device)  # (N_total, H, W, 3) uint8
    labels = torch.cat([s.labels for s in sets]).to(device)
    predictions = torch.full((len(labels),), -1, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    done = 0
    for segment in segments:
        method.reset()
        order = segment.indices.to(device)
        for start in range(0, len(order), batch_size):
            batch_index = order[start : start + batch_size]
            logits = method.adapt(to_float_nchw(images[batch_index]))
            predictions[batch_index] = logits.argmax(1)
            done += len(batch_index)
            on_batch(done)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    wrong = (predictions != labels).float()
    visited = predictions >= 0
    errors = []
    for offset, image_set in zip(set_offsets(sets), sets):
        part = slice(offset, offset + len(image_set))
        seen = visited[part].sum().clamp_min(1)
        errors.append(float(100.0 * (wrong[part] * visited[part]).sum() / seen))
    return RunResult(method.name, errors, predictions.cpu(), seconds, done, method.counters())

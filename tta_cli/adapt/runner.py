"""Run one adaptation method over a stream of test sets and score it per set.

Under torchrun (a joined process group) an episodic method's samples are shared out over the ranks
(`shard_adapt`), the predictions gathered back in the original order, and every rank returns the same
result. Online methods refuse: their stream of weights is sequential.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tta_cli import distributed
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.orders import Segment, set_offsets
from tta_cli.data.imageset import ImageSet, to_float_nchw
from tta_cli.errors import TTAError


@dataclass
class RunResult:
    """errors[i] is the error (%) on sets[i]; predictions (N_total,) in the sets' concatenated order."""

    method: str
    errors: list[float]
    predictions: torch.Tensor
    seconds: float
    samples: int
    counters: dict
    precision: str  # what the path taken computed in: "bf16 autocast" or the model's dtype
    convolutions: str = "torch"  # who ran them: "torch" or "triton where faster"
    errors_std: list[float] | None = None  # over seeds (combine_seeds); None for one run
    seed_errors: list[list[float]] | None = None  # seed_errors[k][i]: run k's error on sets[i]
    sample_wrong: torch.Tensor | None = None  # float (N_total,): 1 wrong, 0 right (mean over seeds), NaN where not visited
    confidences: torch.Tensor | None = None  # float (N_total,): the softmax probability of the predicted class
    # (seconds, samples) at the first progress report: after the first batch, the first 64 steps of online streams
    # side by side, or the first ~1,000 samples of a sequence method. Compiling and CUDA-graph capture happen there.
    first_batch: tuple[float, int] | None = None

    @property
    def steady_samples_per_s(self) -> float | None:
        """Samples/s after the first progress report (first_batch); None when that report was the last."""
        if self.first_batch is None or self.samples <= self.first_batch[1]:
            return None
        return (self.samples - self.first_batch[1]) / max(self.seconds - self.first_batch[0], 1e-9)


def combine_seeds(runs: list[RunResult]) -> RunResult:
    """One method's runs with different seeds as one result: per set the mean error and its standard deviation
    over the runs (n - 1 in the denominator; 0 for one run); seconds and samples summed, the first run's
    predictions and confidences; counters and first batches summed (each run compiles or captures again);
    per-sample wrongness averaged."""
    errors = torch.tensor([run.errors for run in runs], dtype=torch.float64)  # (runs, sets)
    std = errors.std(0, correction=1) if len(runs) > 1 else torch.zeros(errors.shape[1], dtype=torch.float64)
    counters = {name: sum(run.counters.get(name, 0) for run in runs) for name in runs[0].counters}
    first = runs[0]
    return RunResult(
        first.method, errors.mean(0).tolist(), first.predictions, sum(run.seconds for run in runs), sum(run.samples for run in runs),
        counters, first.precision, first.convolutions, std.tolist(), errors.tolist(),
        None if first.sample_wrong is None else torch.stack([run.sample_wrong for run in runs]).mean(0), first.confidences,
        first_batches(runs),
    )


def first_batches(runs: list[RunResult]) -> tuple[float, int] | None:
    """Every run's first batch together (seconds, samples), or None when a run has none."""
    if any(run.first_batch is None for run in runs):
        return None
    return sum(run.first_batch[0] for run in runs), sum(run.first_batch[1] for run in runs)


def run_method(
    method: Method,
    sets: list[ImageSet],
    segments: list[Segment],
    device: torch.device,
    on_batch: Callable[[int], None] = lambda done: None,
    in_order: bool = False,
) -> RunResult:
    """Feed `segments` to `method` in batches; uint8 images live on the device, predictions too. `in_order` keeps
    independent segments one after another on the method's own weights (whose final state is then the stream's)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    if world_size > 1 and not method.episodic:
        raise TTAError(
            f"{method.name} adapts online: the weights for sample t+1 depend on the update at sample t, so its stream "
            f"cannot be split over {world_size} processes; run it as a single process"
        )
    images = torch.cat([s.images for s in sets]).to(device)  # (N_total, H, W, 3) uint8
    labels = torch.cat([s.labels for s in sets]).to(device)
    predictions = torch.full((len(labels),), -1, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    first_batch: list[tuple[float, int]] = []

    def timed(done: int) -> None:
        if not first_batch:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_batch.append((time.perf_counter() - started, done))
        on_batch(done)

    side_by_side = world_size == 1 and not in_order and method.side_by_side(len(segments))
    record = Recorder(predictions)
    if side_by_side:
        done = adapt_side_by_side(method, images, segments, record, timed)
    else:
        done = adapt_in_order(method, images, segments, record, rank, world_size, timed)
    counters = method.counters()
    nonfinite, confidences = record.nonfinite, record.confidences
    if world_size > 1:  # every sample was predicted by exactly one rank
        mine = (predictions >= 0).nonzero().squeeze(1)
        confidences = distributed.gather_in_order(confidences[mine], mine, len(labels))
        predictions = distributed.gather_in_order(predictions[mine], mine, len(labels), fill=-1)
        counters = {name: type(value)(distributed.sum_over_ranks(torch.tensor([value], device=device)).item())
                    for name, value in counters.items()}
        nonfinite = distributed.sum_over_ranks(nonfinite.view(1))
    check_finite(method.name, int(nonfinite), done)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    wrong = (predictions != labels).float()
    visited = predictions >= 0
    errors = []
    for offset, image_set in zip(set_offsets(sets), sets, strict=True):
        part = slice(offset, offset + len(image_set))
        seen = visited[part].sum().clamp_min(1)
        errors.append(float(100.0 * (wrong[part] * visited[part]).sum() / seen))
    return RunResult(method.name, errors, predictions.cpu(), seconds, done, counters, method.precision(side_by_side),
                     method.convolutions(side_by_side), sample_wrong=wrong.masked_fill(~visited, float("nan")).cpu(), confidences=confidences.cpu(),
                     first_batch=first_batch[0] if first_batch else None)


class Recorder:
    """Writes each batch's predicted classes and their softmax probabilities at its rows and counts, on the device
    (no host sync per batch), the samples whose logits are not finite: the mark of updates that diverged."""

    def __init__(self, predictions: torch.Tensor):
        self.predictions = predictions
        self.confidences = torch.zeros(predictions.shape, dtype=torch.float32, device=predictions.device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=predictions.device)

    def __call__(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        confidence, predicted = logits.float().softmax(1).max(1)
        self.predictions[rows] = predicted
        self.confidences[rows] = confidence
        self.nonfinite += (~logits.isfinite().all(1)).sum()


def check_finite(name: str, nonfinite: int, samples: int) -> None:
    """A diverged run is an error, not a table: NaN logits give arbitrary classes that would read as results."""
    if nonfinite and name == "source":  # nothing adapted: the checkpoint itself is broken
        raise TTAError(f"source: {nonfinite} of {samples} predictions of the checkpoint itself were NaN or infinite; retrain it")
    if nonfinite:
        raise TTAError(
            f"{name}: {nonfinite} of {samples} predictions were NaN or infinite, so the adaptation diverged; lower --lr "
            "(or --set tent.lr for tent), or add --rollback for ttt-online; nothing was written"
        )


def adapt_side_by_side(method: Method, images, segments: list[Segment], record: Recorder, on_batch) -> int:
    """Independent segments (each starting from the source weights) adapted together (Method.adapt_streams)."""
    streams = [segment.indices.to(images.device) for segment in segments]
    for stream, logits in zip(streams, method.adapt_streams(images, streams, on_batch), strict=True):
        record(stream, logits)
    return sum(len(stream) for stream in streams)


def adapt_in_order(method: Method, images, segments: list[Segment], record: Recorder, rank: int, world_size: int, on_batch) -> int:
    """Segment after segment, reset before each. One process: batches as the method sizes them (batch_size), runs of
    whole batches per call for a method that takes sequences; under torchrun, `default_batch` samples per batch,
    shared out over the ranks (Method.adapt_shard)."""
    single = world_size == 1
    batch_size = method.default_batch
    if single and segments:
        batch_size = method.batch_size(to_float_nchw(images[segments[0].indices[:8].to(images.device)]))
    sequence = single and method.takes_sequences
    adapt = method.adapt_sequence if sequence else method.adapt
    step = batch_size * -(-1024 // batch_size) if sequence else batch_size
    done = batches = 0
    for segment in segments:
        method.reset()
        order = segment.indices.to(images.device)
        for start in range(0, len(order), step):
            batch_index = order[start : start + step]
            if single:
                record(batch_index, adapt(to_float_nchw(images[batch_index])))
            else:
                rows, logits = method.adapt_shard(to_float_nchw(images[batch_index]), batches, rank, world_size)
                if rows.numel():
                    record(batch_index[rows], logits)
            batches += 1
            done += len(batch_index)
            on_batch(done)
    return done

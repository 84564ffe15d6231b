"""Online test-time training on a video stream, one frame at a time.

Implicit memory: the adapted weights carry over from frame to frame (OnlineTTT, with the same reset and
rollback policies as `tta adapt`). Explicit memory: the last `window` frames stay on the device in a ring
buffer, and each of the `steps` updates per frame trains on `copies` images drawn uniformly from it, each
with a fresh crop/flip and rotation (or mask). With `fps` the stream is paced like a live camera and a frame
that arrives while the loop is behind is only predicted, never dropped.

Unpaced, each frame's prediction (after its update) runs beside the next frame's update on a second CUDA stream,
in one CUDA graph (StreamSettings.overlap): the same weights and logits, the prediction off the critical path.

Per-frame outcomes are gathered on the device and copied to the host every `block` frames (or `view_every`
seconds), so the hot path has no per-frame host synchronisation.

Latency of a frame: wall-clock seconds from its arrival (due time i / fps after the start when paced; the
moment the loop took it from the source when unpaced) until its prediction is complete on the device. On CUDA
that completion is a timing event, turned into wall-clock time at each block's synchronisation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import online_config, online_generator
from tta_cli.adapt.policies import ResetPolicy, RollbackPolicy
from tta_cli.config import StreamSettings
from tta_cli.engine.execution import resolve
from tta_cli.stream.sources import Pacer

COMPARISON = (("none", False), ("episodic", False), ("implicit", False), ("implicit", True), ("explicit", False), ("explicit", True))
ROLLING_FRAMES = 100  # rolling accuracy in the live view
BEHIND_TOLERANCE = 1.0  # frame periods a paced frame may be late and still be adapted on


def comparison_settings(settings: StreamSettings) -> list[StreamSettings]:
    """The runs of `--compare`: every mode, and rollback off/on for the online modes."""
    return [dataclasses.replace(settings, mode=mode, rollback=rollback) for mode, rollback in COMPARISON]


class FrameWindow:
    """The last `size` frames on the device (a ring buffer) and uniform draws from the frames in it.

    Draws read the frame count from a device tensor, so `sample` runs inside a CUDA graph; before the window
    is full it draws with replacement from the frames seen so far, so the batch shape never changes.
    """

    def __init__(self, size: int, frame_shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None):
        self.size = size
        self.frames = torch.zeros(size, *frame_shape, device=device)  # (size, C, H, W)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.pushed = 0
        self.generator = generator

    def push(self, frame: torch.Tensor) -> None:
        """frame (C, H, W): overwrite the oldest slot."""
        self.frames[self.pushed % self.size].copy_(frame)
        self.pushed += 1
        self.count.fill_(min(self.pushed, self.size))

    def sample_slots(self, batch: int) -> torch.Tensor:
        """(batch,) slot indices, uniform over the filled slots."""
        draws = torch.rand(batch, device=self.frames.device, generator=self.generator)
        return (draws * self.count).long().clamp_(max=self.size - 1)

    def sample(self, batch: int) -> torch.Tensor:
        """(batch, C, H, W) frames drawn uniformly, with replacement, from the window."""
        return self.frames.index_select(0, self.sample_slots(batch))


def build_stream_method(
    model: torch.nn.Module, task, settings: StreamSettings, classes: int, device: torch.device, frame_shape: tuple[int, ...]
) -> tuple[OnlineTTT, FrameWindow | None]:
    """A fresh copy of the model behind OnlineTTT, configured for the mode; the window for explicit memory."""
    execution = resolve(settings, device)
    generator = online_generator(settings, execution)
    changes = {"rollback": RollbackPolicy(enabled=False)} if not settings.adapting else {}
    if settings.mode == "episodic":
        changes["reset"] = ResetPolicy(kind="every", every=1)
    config = online_config(settings, execution, settings.steps if settings.adapting else 0, **changes)
    window = None
    if settings.mode == "explicit" and settings.window > 1 and settings.adapting:
        window = FrameWindow(settings.window, frame_shape, device, generator)
    train_source = (lambda: window.sample(settings.copies)) if window is not None else None
    model = copy.deepcopy(model).to(device)
    return OnlineTTT(model, task, config, classes, generator, train_source=train_source), window


@dataclass
class StreamProgress:
    """What the live view shows after each block."""

    frames: int
    fps: float
    latency_ms: float  # median over the last block
    predicted: int
    confidence: float
    rolling_accuracy: float | None  # over the last ROLLING_FRAMES labelled frames
    adapted: int
    rollbacks: int
    resets: int


@dataclass
class StreamResult:
    """Per-frame columns (numpy, one entry per frame) and the run's totals."""

    name: str
    settings: StreamSettings
    columns: dict[str, np.ndarray]
    seconds: float
    counters: dict
    interrupted: bool = False
    summary: dict = field(default_factory=dict)
    adapted: torch.nn.Module | None = None  # the model as the run left it (its final adapted weights)

    def __len__(self) -> int:
        return len(self.columns["frame"])


class FrameLog:
    """Per-frame outcomes on the device, copied to the host one block at a time (one synchronisation per block)."""

    FIELDS = ("predicted", "confidence", "ssl_loss", "rollbacks", "device_resets")

    def __init__(self, block: int, device: torch.device, clock: Callable[[], float], labels: np.ndarray | None):
        self.block = block
        self.device = device
        self.clock = clock
        self.labels = labels
        self.cuda = device.type == "cuda"
        self.values = torch.zeros(block, len(self.FIELDS), device=device)  # (block, fields)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(block)] if self.cuda else None
        self.staging: torch.Tensor | None = None  # pinned host frames of the current block
        self.done_times = [0.0] * block
        self.arrivals: list[float] = []  # the current block's, host-side
        self.adapted: list[bool] = []
        self.scheduled_resets: list[bool] = []
        self.blocks: list[dict[str, np.ndarray]] = []
        self.previous = {"rollbacks": 0.0, "device_resets": 0.0}
        self.totals = {"adapted": 0, "rolled_back": 0, "reset": 0}
        self.filled = 0  # frames in the current block
        self.total = 0
        self.last_flush = clock()

    def upload(self, frame: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (1, 3, H, W) in [0, 1] on the device; CPU frames go through pinned memory."""
        if self.cuda and frame.device.type == "cpu":
            if self.staging is None or self.staging.shape[1:] != frame.shape:
                self.staging = torch.empty(self.block, *frame.shape, dtype=torch.uint8, pin_memory=True)
            staged = self.staging[self.filled]  # reused only after the block's synchronisation
            staged.copy_(frame)
            frame = staged.to(self.device, non_blocking=True)
        else:
            frame = frame.to(self.device)
        return frame.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)

    def wait_inflight(self, max_inflight: int) -> None:
        """Let the host run at most `max_inflight` frames ahead of the GPU (paced runs decide on host time)."""
        if self.cuda and self.total >= max_inflight:
            self.events[(self.filled - max_inflight) % self.block].synchronize()

    def record_prediction(self, row: int, logits: torch.Tensor) -> None:
        """Frame `row` of the block (its state recorded now or next) is predicted: log it, mark the moment (an
        event on CUDA)."""
        confidence, predicted = logits.float().softmax(1).max(1)
        self.values[row, :2].copy_(torch.stack([predicted[0].float(), confidence[0]]))
        if self.cuda:
            self.events[row].record()
        else:
            self.done_times[row] = self.clock()

    def record_state(self, method: OnlineTTT, arrival: float, adapted: bool, scheduled_reset: bool) -> None:
        """The frame's arrival and the state after its update; the frame takes the next row."""
        self.arrivals.append(arrival)
        counts = method.counts
        device_resets = counts["shift_resets"] + counts["collapse_resets"]
        self.values[self.filled, 2:].copy_(torch.stack([method.ssl_loss, counts["rollbacks"].float(), device_resets.float()]))
        self.adapted.append(adapted)
        self.scheduled_resets.append(scheduled_reset)
        self.filled += 1
        self.total += 1

    def due(self, view_every: float) -> bool:
        return self.filled == self.block or (self.filled > 0 and self.clock() - self.last_flush >= view_every)

    def flush(self) -> None:
        """Copy the block to the host (one synchronisation) and turn it into per-frame columns."""
        count = self.filled
        if count == 0:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            now = self.clock()
            last = self.events[count - 1]
            done = np.array([now - event.elapsed_time(last) / 1000.0 for event in self.events[:count]])
        else:
            done = np.array(self.done_times[:count])
        values = self.values[:count].cpu().numpy().astype(np.float64)
        first = self.total - count
        arrivals = np.array(self.arrivals)
        adapted = np.array(self.adapted, dtype=bool)
        block = {
            "frame": np.arange(first, self.total),
            "arrival": arrivals,
            "predicted": values[:, 0].round().astype(np.int64),
            "confidence": values[:, 1],
            "adapted": adapted,
            "rolled_back": self._increments(values[:, 3], "rollbacks"),
            "reset": self._increments(values[:, 4], "device_resets") | np.array(self.scheduled_resets, dtype=bool),
            "ssl_loss": np.where(adapted, values[:, 2], np.nan),
            "latency": np.maximum(done - arrivals, 0.0),
            "label": self._labels(first, self.total),
        }
        self.blocks.append(block)
        for name in self.totals:
            self.totals[name] += int(block[name].sum())
        self.arrivals, self.adapted, self.scheduled_resets = [], [], []
        self.filled = 0
        self.last_flush = self.clock()

    def _increments(self, cumulative: np.ndarray, name: str) -> np.ndarray:
        previous = np.concatenate([[self.previous[name]], cumulative[:-1]])
        self.previous[name] = float(cumulative[-1])
        return cumulative > previous

    def _labels(self, start: int, stop: int) -> np.ndarray:
        labels = np.full(stop - start, -1, dtype=np.int64)
        if self.labels is not None and start < len(self.labels):
            known = self.labels[start:stop]
            labels[: len(known)] = known
        return labels

    def columns(self) -> dict[str, np.ndarray]:
        names = ("frame", "arrival", "predicted", "confidence", "adapted", "rolled_back", "reset", "ssl_loss", "latency", "label")
        if not self.blocks:
            return {name: np.zeros(0) for name in names}
        return {name: np.concatenate([block[name] for block in self.blocks]) for name in names}

    def progress(self, started: float) -> StreamProgress:
        latest = self.blocks[-1]
        recent_labels, recent_predictions = [], []
        for block in reversed(self.blocks):
            recent_labels.insert(0, block["label"])
            recent_predictions.insert(0, block["predicted"])
            if sum(len(labels) for labels in recent_labels) >= ROLLING_FRAMES:
                break
        labels = np.concatenate(recent_labels)[-ROLLING_FRAMES:]
        predictions = np.concatenate(recent_predictions)[-ROLLING_FRAMES:]
        known = labels >= 0
        accuracy = float((predictions[known] == labels[known]).mean()) if known.any() else None
        return StreamProgress(
            frames=self.total,
            fps=self.total / max(self.clock() - started, 1e-9),
            latency_ms=float(np.median(latest["latency"])) * 1000.0,
            predicted=int(latest["predicted"][-1]),
            confidence=float(latest["confidence"][-1]),
            rolling_accuracy=accuracy,
            adapted=self.totals["adapted"],
            rollbacks=self.totals["rolled_back"],
            resets=self.totals["reset"],
        )


def run_stream(
    model: torch.nn.Module,
    task,
    frames: Iterable[tuple[int, torch.Tensor]],
    settings: StreamSettings,
    classes: int,
    device: torch.device,
    labels: torch.Tensor | None = None,
    pacer: Pacer | None = None,
    on_progress: Callable[[StreamProgress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> StreamResult:
    """Adapt a copy of `model` on `frames` ((index, uint8 (H, W, 3)) pairs, in order) and predict every frame.

    `labels` (int64 (T,), optional) score the predictions; `pacer` (default: unpaced, perf_counter) gives the
    clock and, with an fps, the arrival times. Ctrl-C ends the stream early; the frames so far are returned.
    """
    settings.validate()
    pacer = pacer or Pacer(None, clock=time.perf_counter)
    clock = pacer.clock
    label_array = labels.cpu().numpy().astype(np.int64) if labels is not None else None
    log = FrameLog(settings.block, device, clock, label_array)
    paced = pacer.fps is not None
    method: OnlineTTT | None = None
    window: FrameWindow | None = None
    overlap = False
    pending: tuple[int, torch.Tensor] | None = None  # (row, frame) whose prediction comes with the next update
    started = clock()
    interrupted = False

    def resolve_pending() -> None:
        nonlocal pending
        if pending is not None:
            log.record_prediction(pending[0], method.predict(pending[1]))
            pending = None

    try:
        for position, (_, frame) in enumerate(frames):
            if settings.max_frames is not None and position >= settings.max_frames:
                break
            image = log.upload(frame)  # (1, 3, H, W)
            if method is None:
                method, window = build_stream_method(model, task, settings, classes, device, tuple(image.shape[1:]))
                overlap = overlaps(settings, method, paced)
                method.prepare(image, graph_kinds(settings, method, overlap))  # CUDA-graph capture before the clock starts
                if method.config.cuda_graph:  # (CUDA only) the captures drew from it: the same draws either way
                    torch.cuda.manual_seed(settings.seed)
                pacer.start()
                started = clock()
            if paced:
                log.wait_inflight(settings.max_inflight)
                pacer.wait(position, sleep)
            arrival = started + pacer.due_time(position) if paced else clock()
            update = settings.adapting and not pacer.is_behind(position, BEHIND_TOLERANCE)
            if window is not None:
                window.push(image[0])
            resets_before = method.scheduled_resets
            if overlap:  # the previous frame's prediction beside this frame's update
                logits = method.adapt_overlapped(image, None if pending is None else pending[1])
                if pending is not None:
                    log.record_prediction(pending[0], logits)
                pending = (log.filled, image)
            elif settings.pre_update and update:
                log.record_prediction(log.filled, method.adapt(image, update=False))
                method.update(image)
            else:
                log.record_prediction(log.filled, method.adapt(image, update=update))
            log.record_state(method, arrival, update, method.scheduled_resets > resets_before)
            if log.due(settings.view_every):
                resolve_pending()
                log.flush()
                if on_progress is not None:
                    on_progress(log.progress(started))
    except KeyboardInterrupt:
        interrupted = True
    if log.filled:
        resolve_pending()
        log.flush()
        if on_progress is not None:
            on_progress(log.progress(started))
    seconds = clock() - started
    counters = method.counters() if method is not None else {}
    adapted = method.model if method is not None else None
    result = StreamResult(settings.name, settings, log.columns(), seconds, counters, interrupted, adapted=adapted)
    result.summary = summarize(result, method.convolutions() if method is not None else "torch", overlap)
    return result


def overlaps(settings: StreamSettings, method: OnlineTTT, paced: bool) -> bool:
    """Whether each frame's prediction waits for the next frame's update (StreamSettings.overlap): unpaced (the
    next frame is already there) and a method whose predictions can wait (OnlineTTT.can_overlap)."""
    return settings.overlap and not paced and method.can_overlap()


def graph_kinds(settings: StreamSettings, method: OnlineTTT, overlap: bool) -> tuple[str, ...]:
    """The calls the loop will replay (OnlineTTT.prepare captures them): with the overlap, an update alone (first
    frame), update + prediction, and a prediction alone (block ends); before the update, the prediction and then
    the update (the step, whose collapse check needs logits, with rollback); else the step and a prediction (frames
    a paced run is too late to adapt on)."""
    if overlap:
        return ("update", "overlapped", "predict")
    if settings.pre_update:
        return ("predict", "step" if method.config.rollback.enabled else "update")
    return ("step", "predict")


def summarize(result: StreamResult, convolutions: str, overlapped: bool = False) -> dict:
    """Accuracy, latency percentiles, throughput and event counts of one run, who ran its convolutions ("torch" or
    "triton where faster") and whether each prediction ran beside the next update (`overlaps`)."""
    columns = result.columns
    frames = len(result)
    known = columns["label"] >= 0
    correct = columns["predicted"][known] == columns["label"][known]
    latency_ms = columns["latency"] * 1000.0
    accuracy = float(correct.mean()) if known.any() else None

    def percentile(q: float) -> float | None:
        return float(np.percentile(latency_ms, q)) if frames else None

    adapted = int(columns["adapted"].sum())
    return {
        "run": result.name,
        "frames": frames,
        "labelled_frames": int(known.sum()),
        "accuracy": accuracy,
        "error": None if accuracy is None else 100.0 * (1.0 - accuracy),
        "seconds": result.seconds,
        "fps": frames / result.seconds if result.seconds > 0 else math.inf,
        "latency_ms": {"p50": percentile(50), "p95": percentile(95), "max": float(latency_ms.max()) if frames else None},
        "adapted": adapted,
        "skipped_updates": frames - adapted if result.settings.adapting else 0,
        "rollbacks": int(columns["rolled_back"].sum()),
        "resets": int(columns["reset"].sum()),
        "nonfinite_frames": int((~np.isfinite(columns["confidence"])).sum()),  # NaN logits: diverged updates
        "counters": result.counters,
        "interrupted": result.interrupted,
        "convolutions": convolutions,
        "overlapped_predictions": overlapped,
    }

"""The stream loop: window sampling, no-op adaptation, shared reset/rollback policies, pacing and Ctrl-C."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.adapt.policies import ResetPolicy
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.stream.loop import FrameWindow, StreamSettings, comparison_settings, run_stream
from tta_cli.stream.sources import Pacer
from tta_cli.tasks import build_task

CPU = torch.device("cpu")
CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(depth=8, groups=4), task).eval(), task


def random_frames(count: int, seed: int = 0) -> list[tuple[int, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return list(enumerate(torch.randint(0, 256, (count, 32, 32, 3), generator=generator, dtype=torch.uint8)))


def settings(**changes) -> StreamSettings:
    return StreamSettings(**{"copies": 4, "block": 8, **changes})


def run(tiny, frames, **changes):
    model, task = tiny
    return run_stream(model, task, frames, settings(**changes), CLASSES, CPU)


class RecordingTask:
    """The real task, noting which frame each ssl view came from (frames are constant images of value 2 * (i + 1))."""

    def __init__(self, task):
        self.task = task
        self.view_frames: list[set[int]] = []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def apply(self, images, drawn, mode="train"):
        values = images.amax(dim=(1, 2, 3)) * 255  # crops pad with zeros, so the max is the frame's value
        self.view_frames.append({round(value / 2) - 1 for value in values.tolist()})
        return self.task.apply(images, drawn, mode=mode)


class FakeClock:
    """Time that moves only when the loop sleeps or a slow ssl loss is computed: pacing tests without waiting."""

    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class SlowTask:
    """The real task whose ssl loss takes `seconds` of (fake) time: an update slower than the frame rate."""

    def __init__(self, task, clock: FakeClock, seconds: float):
        self.task, self.clock, self.seconds = task, clock, seconds

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, outputs, targets):
        self.clock.now += self.seconds
        return self.task.loss(outputs, targets)


def test_window_draws_only_from_the_last_k_frames():
    window = FrameWindow(4, (1, 1, 1), CPU, torch.Generator().manual_seed(0))
    for index in range(10):
        window.push(torch.full((1, 1, 1), float(index)))
        drawn = set(window.sample(256).flatten().long().tolist())
        assert drawn == set(range(max(0, index - 3), index + 1))  # all of the last 4, nothing older


@pytest.mark.parametrize(("mode", "window", "lookback"), [("explicit", 4, 4), ("explicit", 1, 1), ("implicit", 16, 1)])
def test_updates_train_on_views_of_the_last_window_frames(tiny, mode, window, lookback):
    model, task = tiny
    frames = [(index, torch.full((32, 32, 3), 2 * (index + 1), dtype=torch.uint8)) for index in range(12)]
    recording = RecordingTask(task)
    run_stream(model, recording, frames, settings(mode=mode, window=window, copies=16), CLASSES, CPU)
    assert len(recording.view_frames) == len(frames)  # one step per frame, one apply per step
    for index, drawn in enumerate(recording.view_frames):
        assert drawn <= set(range(max(0, index - lookback + 1), index + 1))
        assert index in drawn or lookback > 1
    assert any(len(drawn) > 1 for drawn in recording.view_frames) == (lookback > 1)  # a real window mixes frames


def test_steps_zero_gives_the_predictions_of_no_adaptation(tiny):
    frames = random_frames(40)
    baseline = run(tiny, frames, mode="none")
    for mode in ("explicit", "implicit", "episodic"):
        still = run(tiny, frames, mode=mode, steps=0, lr=1.0)
        assert torch.equal(torch.from_numpy(still.columns["predicted"]), torch.from_numpy(baseline.columns["predicted"]))
        assert (still.columns["confidence"] == baseline.columns["confidence"]).all()
        assert not still.columns["adapted"].any() and still.summary["adapted"] == 0
    model, _ = tiny
    with torch.no_grad():
        direct = model(torch.stack([frame for _, frame in frames]).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert baseline.columns["predicted"].tolist() == direct.tolist()


def test_adaptation_changes_confidences(tiny):
    frames = random_frames(10)
    adapted = run(tiny, frames, mode="explicit", lr=0.05)
    assert adapted.columns["adapted"].all()
    assert (adapted.columns["confidence"] != run(tiny, frames, mode="none").columns["confidence"]).any()


def test_reset_every_n_fires_as_in_tta_adapt(tiny):
    model, task = tiny
    frames = random_frames(35)
    result = run(tiny, frames, mode="implicit", reset="every:10", lr=0.05, seed=3)
    assert result.columns["reset"].nonzero()[0].tolist() == [10, 20, 30]
    assert result.counters["scheduled_resets"] == 3 and result.summary["resets"] == 3
    # tta adapt's ttt-online: the same OnlineTTT, one sample at a time, from the same seed
    config = OnlineConfig(steps=1, lr=0.05, copies=4, reset=ResetPolicy.parse("every:10"))
    online = OnlineTTT(copy.deepcopy(model), task, config, CLASSES, torch.Generator().manual_seed(3))
    expected = [online.adapt(frame.permute(2, 0, 1)[None].float() / 255).argmax(1).item() for _, frame in frames]
    assert result.columns["predicted"].tolist() == expected


def test_episodic_resets_before_every_frame(tiny):
    result = run(tiny, random_frames(6), mode="episodic", lr=0.05)
    assert result.columns["reset"].tolist() == [False] + [True] * 5


def test_rollback_fires_on_an_absurd_learning_rate(tiny):
    frames = random_frames(12)
    rolled = run(tiny, frames, mode="explicit", lr=1e4, rollback=True)
    assert rolled.summary["rollbacks"] >= 1 and rolled.columns["rolled_back"].any()
    assert rolled.summary["rollbacks"] == rolled.counters["rollbacks"]
    assert run(tiny, frames, mode="explicit", lr=1e4, rollback=False).summary["rollbacks"] == 0


def test_pacing_skips_updates_never_frames(tiny):
    model, task = tiny
    clock = FakeClock()
    frames = random_frames(30)
    result = run_stream(
        model,
        SlowTask(task, clock, 0.035),
        frames,
        settings(mode="implicit"),
        CLASSES,
        CPU,
        pacer=Pacer(100.0, clock=clock),
        sleep=clock.sleep,
    )
    assert result.columns["frame"].tolist() == list(range(30))  # every frame predicted
    adapted = result.columns["adapted"]
    assert adapted[0] and 5 <= adapted.sum() <= 15  # a 35 ms update at 100 fps: about one frame in three
    assert result.summary["skipped_updates"] == 30 - adapted.sum()
    assert (result.columns["latency"] >= 0).all()


def test_pacing_slower_than_the_updates_adapts_every_frame_and_waits(tiny):
    model, task = tiny
    clock = FakeClock()
    result = run_stream(
        model,
        SlowTask(task, clock, 0.035),
        random_frames(10),
        settings(mode="implicit"),
        CLASSES,
        CPU,
        pacer=Pacer(10.0, clock=clock),
        sleep=clock.sleep,
    )
    assert result.columns["adapted"].all()
    assert sum(clock.slept) == pytest.approx(0.9 - 0.035 * 9, abs=1e-6)  # waits for each frame's due time
    assert result.summary["seconds"] == pytest.approx(0.9 + 0.035, abs=1e-6)


def test_pre_update_predicts_before_the_frames_update(tiny):
    frames = random_frames(2)
    before = run(tiny, frames, mode="implicit", lr=0.05, pre_update=True)
    after = run(tiny, frames, mode="implicit", lr=0.05)
    untouched = run(tiny, frames, mode="none")
    assert before.columns["confidence"][0] == untouched.columns["confidence"][0]
    assert after.columns["confidence"][0] != untouched.columns["confidence"][0]
    assert before.columns["adapted"].all()


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_overlapped_predictions_equal_the_plain_loop(tiny, mode):
    """Each frame's prediction handed to the next frame's update call (StreamSettings.overlap) gives the same
    column values as predicting right after each update, across block ends (block 8) and the last frame."""
    frames = random_frames(21)
    plain = run(tiny, frames, mode=mode, lr=0.05, overlap=False)
    overlapped = run(tiny, frames, mode=mode, lr=0.05)
    for name in ("predicted", "confidence", "ssl_loss", "adapted", "frame"):
        assert np.array_equal(overlapped.columns[name], plain.columns[name], equal_nan=name == "ssl_loss"), name
    assert len(overlapped) == 21 and (overlapped.columns["latency"] >= 0).all()
    assert overlapped.summary["overlapped_predictions"] and not plain.summary["overlapped_predictions"]
    assert not run(tiny, frames[:3], mode=mode, rollback=True).summary["overlapped_predictions"]  # rollback acts in between


def test_ctrl_c_ends_the_stream_and_keeps_the_frames_so_far(tiny):
    def interrupted_frames():
        yield from random_frames(7)
        raise KeyboardInterrupt

    result = run(tiny, interrupted_frames(), mode="explicit")
    assert result.interrupted and len(result) == 7 and result.summary["frames"] == 7


def test_max_frames_and_labels_score_the_run(tiny):
    frames = random_frames(20)
    result = run(tiny, frames, mode="none", max_frames=12)
    labels = torch.from_numpy(result.columns["predicted"].copy())
    labels[:3] = (labels[:3] + 1) % CLASSES  # three wrong on purpose
    model, task = tiny
    scored = run_stream(model, task, frames, settings(mode="none", max_frames=12), CLASSES, CPU, labels=labels)
    assert len(scored) == 12 and scored.summary["labelled_frames"] == 12
    assert scored.summary["accuracy"] == pytest.approx(9 / 12)
    assert scored.summary["latency_ms"]["p50"] <= scored.summary["latency_ms"]["p95"] <= scored.summary["latency_ms"]["max"]
    assert scored.summary["convolutions"] == "torch"  # conv_kernels auto takes Triton's on CUDA only


def test_comparison_covers_every_mode_with_rollback_off_and_on():
    names = [run_settings.name for run_settings in comparison_settings(StreamSettings())]
    assert names == ["none", "episodic", "implicit", "implicit+rollback", "explicit+implicit", "explicit+implicit+rollback"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"mode": "sideways"}, "--mode"), ({"steps": -1}, "--steps"), ({"window": 0}, "--window"), ({"reset": "every:0"}, "every")],
)
def test_bad_settings_are_user_errors(changes, message):
    with pytest.raises(TTAError, match=message):
        StreamSettings(**changes).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_cuda_stream_logs_every_frame_with_device_timing(tiny, cuda_graph):
    model, task = tiny
    device = torch.device("cuda")
    frames = random_frames(50)
    labels = torch.randint(0, CLASSES, (50,))
    changes = {"mode": "explicit", "rollback": True, "cuda_graph": cuda_graph, "block": 16}
    result = run_stream(model, task, frames, settings(**changes), CLASSES, device, labels=labels)
    assert result.columns["frame"].tolist() == list(range(50)) and result.columns["adapted"].all()
    assert (result.columns["latency"] > 0).all() and result.summary["latency_ms"]["p95"] < 10_000
    none = run_stream(model, task, frames, settings(mode="none", cuda_graph=cuda_graph), CLASSES, device)
    still = run_stream(model, task, frames, settings(mode="explicit", steps=0, cuda_graph=cuda_graph), CLASSES, device)
    assert (none.columns["predicted"] == still.columns["predicted"]).all()
    paced = run_stream(model, task, frames[:20], settings(**changes), CLASSES, device, pacer=Pacer(200.0, clock=time.perf_counter))
    assert len(paced) == 20 and paced.summary["seconds"] >= 19 / 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_overlapped_predictions_follow_the_plain_loop(tiny):
    """The side-stream prediction inside the update's CUDA graph against the plain loop's step graph, TF32 off. The
    first frames agree to ~1e-8 (kernels in other graphs); over 40 updates that grows, so the bound is 1e-3."""
    model, task = tiny
    device = torch.device("cuda")
    frames = random_frames(40)
    previous, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        runs = [run_stream(model, task, frames, settings(lr=0.01, overlap=overlap), CLASSES, device) for overlap in (False, True)]
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert (runs[0].columns["predicted"] == runs[1].columns["predicted"]).mean() >= 0.95
    assert np.abs(runs[0].columns["confidence"] - runs[1].columns["confidence"]).max() < 1e-3
    assert np.abs(runs[0].columns["ssl_loss"] - runs[1].columns["ssl_loss"]).max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_with_triton_convolutions_follows_torch_convolutions(tiny):
    """conv_kernels auto (Triton's kernels where they timed faster) against torch's only, TF32 off: the same
    predictions and ssl losses over a short adapted stream, on a model whose convolutions really were swapped."""
    from tta_cli.stream.loop import build_stream_method

    model, task = tiny
    device = torch.device("cuda")
    frames = random_frames(40)
    previous, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        runs = [run_stream(model, task, frames, settings(conv_kernels=kernels), CLASSES, device) for kernels in ("torch", "auto")]
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    method, _ = build_stream_method(model, task, settings(), CLASSES, device, (3, 32, 32))
    assert type(method.model.encoder.stem).__name__ == "TritonConv2d"
    assert [run.summary["convolutions"] for run in runs] == ["torch", "triton where faster"]
    assert (runs[0].columns["predicted"] == runs[1].columns["predicted"]).mean() >= 0.95
    losses = [run.columns["ssl_loss"] for run in runs]
    assert np.isfinite(losses[0]).all() and np.abs(losses[0] - losses[1]).max() < 1e-3

"""Stream frame sources (video, png folder, npy, stdin), the prefetch thread, the pacer, and drifting test streams."""

from __future__ import annotations

import io
import math
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tta_cli.data.imageset import ImageSet
from tta_cli.errors import TTAError
from tta_cli.stream import FrameSource, Pacer, fit_square, load_stream_labels, make_stream, open_frames, save_stream
from tta_cli.stream.make import StreamRecipe, make_stream_command

FRAMES, CLIP, SEGMENT_CLIPS, MAX_SEVERITY = 100, 10, 3, 5
CORRUPTIONS = ["gaussian_noise", "clean", "contrast"]
GAUSSIAN_NOISE_STD = [0.0, 0.04, 0.06, 0.08, 0.09, 0.10]  # CIFAR-10-C, by severity 0..5


@pytest.fixture(scope="module")
def images() -> ImageSet:
    """24 smooth random 32x32 images in 4 classes (smooth, so camera motion changes pixels gradually)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(24, 3, 4, 4, generator=generator) * 255
    pixels = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return ImageSet(pixels.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), torch.arange(24) % 4, list("abcd"))


@pytest.fixture(scope="module")
def stream(images):
    return make_stream(
        images, FRAMES, clip_length=CLIP, corruptions=CORRUPTIONS, max_severity=MAX_SEVERITY, seed=3, segment_clips=SEGMENT_CLIPS
    )


@pytest.fixture(scope="module")
def stream_dir(stream, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    save_stream(stream, out, video=True)
    return out


def read_all(source) -> torch.Tensor:
    with source:
        return torch.stack([frame for _, frame in source])


def test_npy_source_yields_the_stream_frames_exactly(stream, stream_dir):
    source = open_frames(stream_dir / "frames.npy", size=32)
    assert len(source) == FRAMES
    assert torch.equal(read_all(source), stream.frames)


def test_png_folder_source_yields_the_stream_frames_exactly(stream, tmp_path):
    for index, frame in enumerate(stream.frames.numpy()):
        Image.fromarray(frame).save(tmp_path / f"{index:05d}.png")
    source = open_frames(tmp_path, size=32)
    assert len(source) == FRAMES
    assert torch.equal(read_all(source), stream.frames)


def test_only_image_files_give_frames_file_names(stream_dir, tmp_path):
    for name in ("b.jpg", "a.png"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    assert open_frames(tmp_path, size=8).file_names == ["a.png", "b.jpg"]
    assert open_frames(stream_dir, size=32).file_names is None  # a stream folder reads its frames.npy
    assert open_frames(stream_dir / "stream.mp4", size=32).file_names is None


def test_video_source_yields_the_stream_frames_losslessly(stream, stream_dir):
    source = open_frames(stream_dir / "stream.mp4", size=32)
    assert source.native_fps == pytest.approx(30.0)
    assert len(source) == FRAMES
    assert torch.equal(read_all(source), stream.frames)


def test_stream_folder_without_images_reads_its_frames_npy(stream, stream_dir):
    assert torch.equal(read_all(open_frames(stream_dir, size=32)), stream.frames)


def test_stdin_source_reads_raw_rgb_frames(stream, monkeypatch):
    raw = stream.frames[:7].numpy().tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    frames = read_all(open_frames("-", size=32, stdin_size="32x32"))
    assert torch.equal(frames, stream.frames[:7])


def test_frames_are_resized_on_the_shorter_side_and_center_cropped(tmp_path):
    wide = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    wide[:, :, 20:60] = 255  # a white band exactly as wide as the centre crop
    np.save(tmp_path / "wide.npy", wide)
    frames = read_all(open_frames(tmp_path / "wide.npy", size=20))
    assert frames.shape == (2, 20, 20, 3)
    assert frames[:, 2:-2, 2:-2].min() == 255


def test_fit_square_leaves_frames_of_the_right_size_unchanged_and_handles_batches():
    frames = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(fit_square(frames, 32), frames)
    assert fit_square(torch.randint(0, 256, (5, 48, 64, 3), dtype=torch.uint8), 24).shape == (5, 24, 24, 3)


def test_labels_and_schedule_read_back_beside_every_source(stream, stream_dir):
    for source in (stream_dir / "stream.mp4", stream_dir / "frames.npy", stream_dir):
        truth = load_stream_labels(source)
        assert torch.equal(truth.labels, stream.labels)
        assert torch.equal(truth.clip_ids, stream.clip_ids)
        assert truth.corruption == stream.corruption
        assert torch.allclose(truth.severity, stream.severity, atol=1e-4)
        assert truth.class_names == stream.class_names
    assert np.load(stream_dir / "labels.npy").dtype == np.int64


def test_labels_npy_alone_is_enough_and_no_labels_gives_none(tmp_path):
    np.save(tmp_path / "frames.npy", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    assert load_stream_labels(tmp_path / "frames.npy") is None
    np.save(tmp_path / "labels.npy", np.array([2, 2, 5]))
    truth = load_stream_labels(tmp_path / "frames.npy")
    assert truth.labels.tolist() == [2, 2, 5] and truth.severity is None


def test_each_clip_shows_one_image_and_one_label(stream):
    assert stream.frames.shape == (FRAMES, 32, 32, 3) and stream.frames.dtype == torch.uint8
    for clip in stream.clip_ids.unique():
        clip_labels = stream.labels[stream.clip_ids == clip]
        assert (clip_labels == clip_labels[0]).all()
    assert (torch.bincount(stream.clip_ids) == CLIP).all()


def test_camera_moves_smoothly_within_a_clean_clip(stream):
    clean_frames = [index for index, name in enumerate(stream.corruption) if name == "clean"]
    clip = stream.frames[clean_frames[:CLIP]].float()
    steps = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
    assert (steps > 0).all()  # the view moves every frame
    assert steps.max() < 20  # ... by a little


def test_severity_drifts_gradually_and_corruption_changes_only_when_nearly_clean(stream):
    severity = stream.severity
    segment_frames = SEGMENT_CLIPS * CLIP
    assert severity.min() >= 0 and severity.max() <= MAX_SEVERITY
    assert (severity[1:] - severity[:-1]).abs().max() <= MAX_SEVERITY * math.pi / segment_frames + 1e-5
    changes = [index for index in range(1, FRAMES) if stream.corruption[index] != stream.corruption[index - 1]]
    assert changes == [segment_frames, 2 * segment_frames, 3 * segment_frames]
    assert all(severity[index - 1] < 1 and severity[index] < 1 for index in changes)
    assert set(stream.corruption) == set(CORRUPTIONS)
    assert (severity[[name == "clean" for name in stream.corruption]] == 0).all()
    noisy = severity[[name == "gaussian_noise" for name in stream.corruption]]
    assert noisy.max() > MAX_SEVERITY - 0.1


def test_fractional_severity_scales_one_noise_field_smoothly(stream, images):
    clean = make_stream(images, FRAMES, clip_length=CLIP, corruptions=["clean"], seed=3, segment_clips=SEGMENT_CLIPS)
    noisy = torch.tensor([name == "gaussian_noise" for name in stream.corruption])
    noise_size = (stream.frames[noisy].float() - clean.frames[noisy].float()).abs().mean(dim=(1, 2, 3))
    expected_std = torch.from_numpy(np.interp(stream.severity[noisy].numpy(), range(6), GAUSSIAN_NOISE_STD))
    ratio = noise_size / (255 * expected_std)  # E|N(0, 1)| = 0.80, a little less where values clip
    assert ratio.min() > 0.6 and ratio.max() < 0.85  # independent noise per level would dip to 0.57 between levels
    assert torch.corrcoef(torch.stack([noise_size.double(), expected_std]))[0, 1] > 0.98


def test_same_seed_gives_the_same_stream_and_another_seed_another(stream, images):
    again = make_stream(
        images, FRAMES, clip_length=CLIP, corruptions=CORRUPTIONS, max_severity=MAX_SEVERITY, seed=3, segment_clips=SEGMENT_CLIPS
    )
    other = make_stream(
        images, FRAMES, clip_length=CLIP, corruptions=CORRUPTIONS, max_severity=MAX_SEVERITY, seed=4, segment_clips=SEGMENT_CLIPS
    )
    assert torch.equal(again.frames, stream.frames) and torch.equal(again.labels, stream.labels)
    assert not torch.equal(other.frames, stream.frames)


def test_make_stream_rejects_bad_requests(images):
    with pytest.raises(TTAError, match="at least one frame"):
        make_stream(images, 0, corruptions=["clean"])
    with pytest.raises(TTAError, match="max severity"):
        make_stream(images, 10, corruptions=["clean"], max_severity=6)
    with pytest.raises(TTAError):
        make_stream(images, 10, corruptions=["no_such_corruption"])


def test_make_stream_command_saves_a_stream_of_the_mini_test_split(tmp_path):
    recipe = StreamRecipe(frames=24, clip_length=8, corruptions=["clean"], seed=0, video=False)
    summary = make_stream_command("cifar10-mini", tmp_path, recipe, device="cpu")
    assert summary["frames"] == 24 and summary["clips"] == 3 and summary["size"] == 32
    assert sorted(path.name for path in tmp_path.iterdir()) == ["frames.npy", "labels.npy", "manifest.json", "schedule.csv", "stream.json"]
    assert load_stream_labels(tmp_path).class_names[0] == "airplane"


class CountingReader:
    """A stand-in decoder: counts frames made, can fail after `fail_after` frames, endless when `frames` is None."""

    native_fps = None
    description = "test reader"
    file_names = None

    def __init__(self, frames: int | None = None, fail_after: int | None = None):
        self.length = frames
        self.fail_after = fail_after
        self.made = 0

    def frames(self, size):
        while self.length is None or self.made < self.length:
            if self.made == self.fail_after:
                raise RuntimeError("decoder broke")
            self.made += 1
            yield np.full((size, size, 3), self.made % 256, dtype=np.uint8)


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "tta-frame-prefetch"]


def test_prefetch_thread_error_reraises_in_the_consumer():
    source = FrameSource(CountingReader(fail_after=3), size=4, fps=None, prefetch=2)
    received = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for index, _ in source:
            received.append(index)
    assert received == [0, 1, 2]


def test_prefetch_runs_ahead_by_a_bounded_amount_and_stops_on_close():
    reader = CountingReader()
    source = FrameSource(reader, size=4, fps=None, prefetch=4)
    frames = iter(source)
    next(frames)
    time.sleep(0.3)
    assert 4 <= reader.made <= 4 + 3  # queue full, plus the frame taken and one in hand
    source.close()
    assert not prefetch_threads()
    made = reader.made
    time.sleep(0.1)
    assert reader.made == made


def test_unknown_length_has_no_len():
    source = FrameSource(CountingReader(), size=4, fps=None, prefetch=2)
    with pytest.raises(TypeError):
        len(source)


def test_pacer_schedules_frames_at_index_over_fps():
    now = [100.0]
    pacer = Pacer(fps=10.0, clock=lambda: now[0])
    pacer.start()
    assert pacer.due_time(25) == pytest.approx(2.5)
    now[0] = 102.0
    assert pacer.frames_due() == 21
    assert pacer.lag(15) == pytest.approx(0.5)
    assert pacer.is_behind(15) and pacer.is_behind(18) and not pacer.is_behind(20) and not pacer.is_behind(25)
    slept = []
    pacer.wait(25, sleep=slept.append)
    assert slept == [pytest.approx(0.5)]
    unpaced = Pacer(fps=None)
    assert unpaced.frames_due() is None and unpaced.lag(10**6) == 0.0 and not unpaced.is_behind(10**6)


def test_source_pacer_uses_the_override_fps_else_the_native_rate(stream_dir):
    assert open_frames(stream_dir / "stream.mp4", size=32).pacer().fps == pytest.approx(30.0)
    assert open_frames(stream_dir / "stream.mp4", size=32, fps=5).pacer().fps == 5
    assert open_frames(stream_dir / "frames.npy", size=32).pacer().fps is None


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda folder: folder / "missing.mp4", "does not exist"),
        (lambda folder: folder, "holds no frames"),
        (lambda folder: _save(folder / "gray.npy", np.zeros((4, 8, 8), dtype=np.uint8)), r"\(T, H, W, 3\)"),
        (lambda folder: _save(folder / "float.npy", np.zeros((4, 8, 8, 3), dtype=np.float32)), "uint8"),
        (lambda folder: _write(folder / "broken.mp4", b"not a video at all" * 10), "cannot open video"),
        (lambda folder: _write(folder / "frames.txt", b"hello"), "cannot read frames"),
    ],
)
def test_bad_sources_raise_actionable_errors(tmp_path, make_input, message):
    with pytest.raises(TTAError, match=message):
        open_frames(make_input(tmp_path), size=32)


def test_stdin_needs_a_valid_size_and_whole_frames(monkeypatch):
    with pytest.raises(TTAError, match="--stdin-size"):
        open_frames("-", size=32)
    with pytest.raises(TTAError, match="WxH"):
        open_frames("-", size=32, stdin_size="32by32")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bytes(32 * 32 * 3 + 10))))
    with pytest.raises(TTAError, match="inside frame 1"):
        read_all(open_frames("-", size=32, stdin_size="32x32"))


def test_missing_pyav_is_a_clear_error(stream_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(TTAError, match="pip install av"):
        open_frames(stream_dir / "stream.mp4", size=32)


def _save(path, array):
    np.save(path, array)
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_lossy_video_of_another_size_is_resized_and_cropped_to_the_model_input(tmp_path):
    import av

    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(12, 3, 3, 4, generator=generator) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear")
    frames = smooth.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (12, 48, 64, 3)
    path = tmp_path / "camera.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    source = open_frames(path, size=32)
    assert source.native_fps == pytest.approx(25.0)
    decoded = read_all(source)
    assert decoded.shape == (12, 32, 32, 3)
    assert (decoded.float() - fit_square(frames, 32).float()).abs().mean() < 6  # H.264 4:2:0 is lossy, but close

"""Frame sources for `tta stream`: video files, frame folders, .npy arrays and raw stdin, all read the same way.

Every source yields `(index, frame)` with frame a uint8 (size, size, 3) CPU tensor (shorter side resized with
antialiasing, then center-cropped). Decoding runs ahead in a background thread so the adapt loop rarely waits on it.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from tta_cli.errors import TTAError

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_PREFETCH = 64

_END = object()


def open_frames(
    source: str | Path,
    size: int,
    fps: float | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    stdin_size: str | tuple[int, int] | None = None,
) -> FrameSource:
    """Open a video file, a folder of jpg/png frames (sorted by name), a (T, H, W, 3) uint8 .npy, or "-" (stdin).

    A folder with no images but a `frames.npy` (a `tta stream make` output) reads that array. `fps` sets the
    pacing rate and overrides the video's own rate. "-" reads raw RGB24 frames of `stdin_size` ("WxH") from stdin.
    Problems visible up front (missing file, bad shape, unreadable video) raise TTAError here, not mid-stream.
    """
    if size < 1:
        raise TTAError(f"frame size must be a positive number of pixels, got {size}")
    if prefetch < 1:
        raise TTAError(f"prefetch must be at least 1 frame, got {prefetch}")
    if fps is not None and not fps > 0:
        raise TTAError(f"--fps must be positive, got {fps}")
    if str(source) == "-":
        width, height = _parse_stdin_size(stdin_size)
        if sys.stdin is None or sys.stdin.closed:
            raise TTAError("stdin is closed: pipe raw RGB24 frames into `tta stream run -`, e.g. from ffmpeg")
        reader = _StdinReader(width, height)
    else:
        path = Path(source)
        if not path.exists():
            raise TTAError(f"frame source {path} does not exist; give a video file, a frame folder, a .npy or '-'")
        reader = _open_path(path)
    return FrameSource(reader, size=size, fps=fps, prefetch=prefetch)


class FrameSource:
    """Iterate `(index, uint8 (size, size, 3) CPU tensor)`; `len()` works when the frame count is known.

    `file_names` holds each frame's file name relative to its folder when the frames are image files, else None.

    Each `iter()` starts a fresh pass with its own decode thread; `close()` (or leaving a `with` block) stops it.
    """

    def __init__(self, reader: _Reader, size: int, fps: float | None, prefetch: int):
        self.reader = reader
        self.size = size
        self.prefetch = prefetch
        self.native_fps = reader.native_fps
        self.fps = fps if fps is not None else reader.native_fps
        self.length = reader.length
        self.description = reader.description
        self.file_names = reader.file_names
        self._active: _Prefetcher | None = None

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"the frame count of {self.description} is not known before reading it")
        return self.length

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        self.close()
        prefetcher = _Prefetcher(lambda: self._resized_frames(), self.prefetch)
        self._active = prefetcher
        return self._consume(prefetcher)

    def pacer(self, clock: Callable[[], float] = time.monotonic) -> Pacer:
        """A clock that says when each frame of this source is due (unpaced when no rate is known)."""
        return Pacer(self.fps, clock=clock)

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _resized_frames(self) -> Iterator[torch.Tensor]:
        for frame in self.reader.frames(self.size):
            yield fit_square(frame, self.size)

    def _consume(self, prefetcher: _Prefetcher) -> Iterator[tuple[int, torch.Tensor]]:
        try:
            yield from enumerate(prefetcher)
        finally:
            prefetcher.close()


def fit_square(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> uint8 (..., size, size, 3): shorter side to `size` (antialiased bilinear), center crop.

    Works on a frame or a batch, on any device; frames already size x size come back unchanged (bit-exact).
    """
    image = torch.as_tensor(images)
    height, width = image.shape[-3:-1]
    if (height, width) == (size, size):
        return image.contiguous()
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_height, new_width) != (height, width):
        batch = image.reshape(-1, height, width, 3).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last memory
        if batch.device.type == "cpu":  # uint8 fast path
            resized = functional.interpolate(batch, size=(new_height, new_width), mode="bilinear", antialias=True)
        else:
            resized = functional.interpolate(batch.float(), size=(new_height, new_width), mode="bilinear", antialias=True)
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        image = resized.permute(0, 2, 3, 1).reshape(*image.shape[:-3], new_height, new_width, 3)
        height, width = new_height, new_width
    top, left = (height - size) // 2, (width - size) // 2
    return image[..., top : top + size, left : left + size, :].contiguous()


@dataclass
class Pacer:
    """Arrival clock for a live-like stream: frame i is due `i / fps` seconds after `start()`.

    The source never drops frames; the adapt loop asks `lag(i)` or `frames_due()` to decide whether to skip an
    update when it is behind. With `fps=None` every frame is due at once and nothing is ever late.
    """

    fps: float | None
    clock: Callable[[], float] = time.monotonic
    start_time: float | None = field(default=None)

    def start(self) -> None:
        self.start_time = self.clock()

    def elapsed(self) -> float:
        if self.start_time is None:
            self.start()
        return self.clock() - self.start_time

    def due_time(self, index: int) -> float:
        """Seconds after start at which frame `index` arrives."""
        return 0.0 if self.fps is None else index / self.fps

    def lag(self, index: int) -> float:
        """How far behind frame `index`'s arrival the consumer is (negative: early; 0 when unpaced)."""
        if self.fps is None:
            return 0.0
        return self.elapsed() - self.due_time(index)

    def frames_due(self) -> int | None:
        """How many frames have arrived by now (None when unpaced: all of them)."""
        if self.fps is None:
            return None
        return math.floor(self.elapsed() * self.fps) + 1

    def is_behind(self, index: int, tolerance_frames: float = 1.0) -> bool:
        """True when frame `index` is more than `tolerance_frames` frame periods late."""
        if self.fps is None:
            return False
        return self.lag(index) > tolerance_frames / self.fps

    def wait(self, index: int, sleep: Callable[[float], None] = time.sleep) -> None:
        """Sleep until frame `index` is due, to replay a file at camera speed."""
        early = -self.lag(index)
        if early > 0:
            sleep(early)


class _Prefetcher:
    """Runs `make_frames()` in a daemon thread into a bounded queue; errors re-raise in the consumer."""

    def __init__(self, make_frames: Callable[[], Iterator[torch.Tensor]], capacity: int):
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_frames,), name="tta-frame-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make_frames: Callable[[], Iterator[torch.Tensor]]) -> None:
        frames = None
        try:
            frames = make_frames()
            for frame in frames:
                if not self._put(frame):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(error))
        finally:
            if frames is not None and hasattr(frames, "close"):
                frames.close()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread.is_alive() or not self._queue.empty():
                    continue
                return  # closed: the worker stopped without finishing
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


@dataclass
class _Failure:
    error: BaseException


class _Reader:
    """One source type: metadata known at open time, `frames(size)` yields uint8 (H, W, 3) arrays."""

    length: int | None = None
    native_fps: float | None = None
    description: str = ""
    file_names: list[str] | None = None  # frame i's image file, relative to the folder (image folders only)

    def frames(self, size: int) -> Iterator[np.ndarray | torch.Tensor]:
        raise NotImplementedError


def _open_path(path: Path) -> _Reader:
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if images:
            return _FolderReader(path, images)
        if (path / "frames.npy").is_file():
            return _NpyReader(path / "frames.npy")
        raise TTAError(f"folder {path} holds no frames: expected .jpg/.png files (read in name order) or a frames.npy")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _NpyReader(path)
    if suffix in VIDEO_SUFFIXES:
        return _VideoReader(path)
    raise TTAError(
        f"cannot read frames from {path}: use a video ({', '.join(VIDEO_SUFFIXES)}), a folder of jpg/png frames, "
        "a (T, H, W, 3) uint8 .npy, or '-' for raw RGB on stdin"
    )


def open_frames_npy(path: Path) -> np.ndarray:
    """A .npy of frames, memory-mapped and checked: uint8 (T, H, W, 3) with T > 0 (frames.npy of `tta stream make`)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TTAError(f"cannot read {path} as a .npy array: {error}") from None
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise TTAError(
            f"{path} holds a {array.dtype} array of shape {array.shape}; "
            "frames must be uint8 of shape (T, H, W, 3) (RGB, channels last)"
        )
    if array.shape[0] == 0:
        raise TTAError(f"{path} holds no frames (T = 0)")
    return array


class _NpyReader(_Reader):
    def __init__(self, path: Path):
        self.array = open_frames_npy(path)
        self.length = int(self.array.shape[0])
        self.description = str(path)

    def frames(self, size: int) -> Iterator[np.ndarray]:
        for frame in self.array:
            yield np.array(frame)  # copy out of the memory map so the consumer owns it


class _FolderReader(_Reader):
    def __init__(self, folder: Path, images: list[Path]):
        self.images = images
        self.file_names = [image.relative_to(folder).as_posix() for image in images]
        self.length = len(images)
        self.description = str(folder)

    def frames(self, size: int) -> Iterator[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        for image_path in self.images:
            try:
                with Image.open(image_path) as image:
                    yield np.array(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as error:
                raise TTAError(f"cannot read frame {image_path}: {error}") from None


class _VideoReader(_Reader):
    """Decodes with PyAV; large frames are shrunk by FFmpeg's swscale (area filter) while converting to RGB."""

    def __init__(self, path: Path):
        av = import_av()
        self.path = path
        self.description = str(path)
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise TTAError(f"{path} has no video stream")
                stream = container.streams.video[0]
                self.length = int(stream.frames) or None
                rate = stream.average_rate or stream.guessed_rate
                self.native_fps = float(rate) if rate else None
        except av.FFmpegError as error:
            raise TTAError(f"cannot open video {path}: {error}; is it a complete, supported video file?") from None

    def frames(self, size: int) -> Iterator[np.ndarray]:
        av = import_av()
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    scale = size / min(frame.width, frame.height)
                    if scale < 1:
                        width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
                        frame = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                    yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise TTAError(f"cannot decode video {self.path}: {error}") from None


class _StdinReader(_Reader):
    """Raw RGB24 frames, `width * height * 3` bytes each, until end of input (e.g. piped from ffmpeg)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.description = f"stdin ({width}x{height} raw RGB)"

    def frames(self, size: int) -> Iterator[np.ndarray]:
        frame_bytes = self.width * self.height * 3
        read = _stdin_reader()
        index = 0
        while True:
            chunk = read(frame_bytes)
            if not chunk:
                return
            while len(chunk) < frame_bytes:
                more = read(frame_bytes - len(chunk))
                if not more:
                    raise TTAError(
                        f"stdin ended inside frame {index}: got {len(chunk)} of {frame_bytes} bytes; "
                        f"is --stdin-size {self.width}x{self.height} the size of the raw RGB24 frames?"
                    )
                chunk += more
            yield np.frombuffer(chunk, dtype=np.uint8).reshape(self.height, self.width, 3).copy()
            index += 1


def _stdin_reader() -> Callable[[int], bytes]:
    """read(n) on stdin. A real file descriptor is read with os.read, which holds no lock: the decode thread may be
    blocked in it on a stalled pipe when Ctrl-C ends the program, and a thread blocked inside sys.stdin.buffer would
    abort the interpreter at exit (exit 134). A closed or missing stdin is a one-line error."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        raise TTAError("stdin is closed: pipe raw RGB24 frames into `tta stream run -`, e.g. from ffmpeg")
    try:
        descriptor = stdin.fileno()
        os.fstat(descriptor)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (an in-memory stream, as in tests)
        buffer = getattr(stdin, "buffer", stdin)
        return buffer.read

    def read(count: int) -> bytes:
        try:
            return os.read(descriptor, count)
        except OSError as error:
            raise TTAError(f"cannot read frames from stdin: {error.strerror}") from None

    return read


def _parse_stdin_size(stdin_size: str | tuple[int, int] | None) -> tuple[int, int]:
    if stdin_size is None:
        raise TTAError("reading frames from stdin ('-') needs --stdin-size WxH (e.g. 640x480, raw RGB24 frames)")
    if isinstance(stdin_size, str):
        parts = stdin_size.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise TTAError(f"--stdin-size {stdin_size!r} is not WxH, e.g. 640x480")
        stdin_size = (int(parts[0]), int(parts[1]))
    width, height = stdin_size
    if width < 1 or height < 1:
        raise TTAError(f"--stdin-size must be positive, got {width}x{height}")
    return width, height


def import_av(alternative: str = "or convert the video to a frame folder or .npy") -> Any:
    """PyAV, imported only when a video is read or written; missing PyAV is a user-fixable error."""
    try:
        import av
    except ImportError:
        raise TTAError(f"reading or writing video needs PyAV: pip install av (its wheels bundle FFmpeg); {alternative}") from None
    return av

"""Labelled drifting test streams: clips of one image under smooth camera motion, with a corruption that drifts.

The stream is T frames cut into clips of `clip_length` frames; each clip shows ONE test image (so one label)
through a pan-and-zoom crop that eases from a random start to a random end view. Clips are grouped into
segments of `segment_clips` clips; each segment has one corruption whose severity rises smoothly from ~0 to
`max_severity` and back (a half sine over the segment; the last may be cut short), so the shift drifts
gradually and changes type while the frames are nearly clean. Fractional severity s blends the corrupted
frames at floor(s) and ceil(s) (level 0 = clean), each level computed on the same batch with the same seed
so the random draws line up (a blend of two noise levels is one noise field, scaled).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from tta_cli.corrupt import REGISTRY, resolve_corruptions
from tta_cli.data.imageset import ImageSet
from tta_cli.data.labels import as_class_indices
from tta_cli.data.sources import load_split
from tta_cli.device import resolve_device
from tta_cli.errors import TTAError
from tta_cli.files import atomic_write, write_csv, write_json
from tta_cli.stream.sources import fit_square, import_av

CLEAN = "clean"
VIDEO_NAME = "stream.mp4"
DEFAULT_FPS = 30.0
# Clips per corruption segment: 40 clips of 30 frames is 40 s of video at 30 fps per corruption, a drift on the
# time scale of weather or light, long enough for online memory to pay off before the next shift (docs/results.md).
# `--segment-clips 4` makes a fast drift (a new corruption every 4 s).
DEFAULT_SEGMENT_CLIPS = 40
MIN_ZOOM = 0.7  # the tightest crop shows 70% of the image side
PAN_SLACK = 0.1  # the crop may leave the image by this much (normalised units); reflection fills it
CHUNK_PIXELS = 2**24  # pixels rendered / corrupted per batch (16384 frames of 32x32), to bound memory
FRAME_COPIES = 3  # uint8 copies of all frames alive at once while saving (device tensor, numpy, the file's buffer)
PER_FRAME_BYTES = 1024  # labels, clip ids, severity, camera motion and the schedule row (a dict) of one frame


@dataclass
class StreamData:
    """frames: uint8 (T, size, size, 3) on the device they were made on; the rest on the CPU.

    labels, clip_ids: int64 (T,); corruption: per-frame name; severity: float32 (T,), 0 = clean.
    """

    frames: torch.Tensor
    labels: torch.Tensor
    clip_ids: torch.Tensor
    corruption: list[str]
    severity: torch.Tensor
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def schedule(self) -> list[dict[str, Any]]:
        """One row per frame, as written to schedule.csv (plots shade the shift from it)."""
        return [
            {"frame": index, "clip": clip, "label": label, "corruption": name, "severity": round(severity, 4)}
            for index, (clip, label, name, severity) in enumerate(
                zip(self.clip_ids.tolist(), self.labels.tolist(), self.corruption, self.severity.tolist(), strict=True)
            )
        ]


@dataclass
class StreamLabels:
    """Ground truth beside a stream source; fields other than labels are None when only labels.npy exists."""

    labels: torch.Tensor  # int64 (T,)
    clip_ids: torch.Tensor | None = None
    corruption: list[str] | None = None
    severity: torch.Tensor | None = None
    class_names: list[str] | None = None


def make_stream(
    images: ImageSet,
    frames: int,
    clip_length: int = 30,
    corruptions: list[str] | str | None = None,
    max_severity: int = 5,
    seed: int = 0,
    size: int = 32,
    segment_clips: int = DEFAULT_SEGMENT_CLIPS,
    device: torch.device | str | None = None,
) -> StreamData:
    """Build a labelled drifting stream of `frames` frames from `images` (deterministic for a seed).

    Runs on `device` (default: where `images` are), batched over frames. Corruptions are applied in the
    given order, cycling; the name "clean" gives a segment with no corruption.
    """
    if frames < 1:
        raise TTAError(f"a stream needs at least one frame, got --frames {frames}")
    if clip_length < 1 or segment_clips < 1:
        raise TTAError(f"clip length and clips per corruption must be positive, got {clip_length} and {segment_clips}")
    if len(images) == 0:
        raise TTAError("cannot make a stream from an empty image set")
    if not 0 <= max_severity <= 5:
        raise TTAError(f"max severity must be between 0 and 5, got {max_severity}")
    names = _resolve_names(corruptions)
    device = torch.device(device) if device is not None else images.images.device
    generator = torch.Generator().manual_seed(seed)

    frame_index = torch.arange(frames)
    clip_ids = frame_index // clip_length  # (T,)
    n_clips = int(clip_ids[-1]) + 1
    clip_sources = _pick_images(len(images), n_clips, generator)  # (n_clips,)
    labels = images.labels.cpu()[clip_sources[clip_ids]].long()

    theta = _camera_motion(clip_ids, clip_length, generator)  # (T, 2, 3)
    segment_ids = clip_ids // segment_clips
    segment_names = [names[segment % len(names)] for segment in range(int(segment_ids[-1]) + 1)]
    severity = _severity_ramp(frames, segment_clips * clip_length, max_severity)
    severity[torch.tensor([name == CLEAN for name in segment_names])[segment_ids]] = 0.0

    clip_images = images.images[clip_sources.to(images.images.device)].to(device)  # only the images shown
    clean = _render(fit_square(clip_images, size), clip_ids.to(device), theta.to(device), size)
    frames_out = _corrupt_by_schedule(clean, segment_ids, segment_names, severity, max_severity, seed)
    meta = {
        "frames": frames,
        "clip_length": clip_length,
        "segment_clips": segment_clips,
        "corruptions": names,
        "max_severity": max_severity,
        "seed": seed,
        "size": size,
        "source": dict(images.meta),
    }
    return StreamData(
        frames=frames_out,
        labels=labels,
        clip_ids=clip_ids,
        corruption=[segment_names[segment] for segment in segment_ids.tolist()],
        severity=severity,
        class_names=list(images.class_names),
        meta=meta,
    )


def _resolve_names(corruptions: list[str] | str | None) -> list[str]:
    """Validate names through tta_cli.corrupt, keeping the user's order; "clean" is a no-corruption segment."""
    if corruptions is None:
        return resolve_corruptions(None)
    if isinstance(corruptions, str):
        corruptions = corruptions.split(",")
    names: list[str] = []
    for name in (part.strip() for part in corruptions):
        if name:
            names.extend([CLEAN] if name.lower() == CLEAN else resolve_corruptions(name))
    if not names:
        raise TTAError("no corruptions given; name at least one (or 'clean')")
    return names


def _pick_images(n_images: int, n_clips: int, generator: torch.Generator) -> torch.Tensor:
    """Each clip shows a different image until all are used (random order), then a fresh order."""
    rounds = math.ceil(n_clips / n_images)
    return torch.cat([torch.randperm(n_images, generator=generator) for _ in range(rounds)])[:n_clips]


def _camera_motion(clip_ids: torch.Tensor, clip_length: int, generator: torch.Generator) -> torch.Tensor:
    """Per-frame affine crops (T, 2, 3): zoom and pan ease (cosine) from a random start to a random end view."""
    n_clips = int(clip_ids[-1]) + 1
    frames = clip_ids.shape[0]
    zoom = MIN_ZOOM + (1 - MIN_ZOOM) * torch.rand(n_clips, 2, generator=generator)  # (clips, start/end)
    reach = (1 - zoom) + PAN_SLACK
    shift = (2 * torch.rand(n_clips, 2, 2, generator=generator) - 1) * reach[..., None]  # (clips, start/end, xy)
    clip_sizes = torch.bincount(clip_ids, minlength=n_clips)
    position = torch.arange(frames) - clip_ids * clip_length
    progress = position / (clip_sizes[clip_ids] - 1).clamp(min=1)
    ease = (1 - torch.cos(math.pi * progress)) / 2  # (T,)
    frame_zoom = torch.lerp(zoom[clip_ids, 0], zoom[clip_ids, 1], ease)
    frame_shift = torch.lerp(shift[clip_ids, 0], shift[clip_ids, 1], ease[:, None])  # (T, 2)
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = frame_zoom
    theta[:, 1, 1] = frame_zoom
    theta[:, :, 2] = frame_shift
    return theta


def _severity_ramp(frames: int, segment_frames: int, max_severity: int) -> torch.Tensor:
    """float32 (T,): a half sine per segment, near 0 at both ends and `max_severity` in the middle.

    The ramp always spans a full segment, so a stream that ends mid-segment ends mid-shift (never a steep ramp).
    """
    progress = (torch.arange(frames) % segment_frames + 0.5) / segment_frames
    return (max_severity * torch.sin(math.pi * progress)).float()


def _render(clip_images: torch.Tensor, clip_ids: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sample each frame's crop from its clip's image: uint8 (T, size, size, 3), reflective padding."""
    frames = torch.empty(theta.shape[0], size, size, 3, dtype=torch.uint8, device=clip_images.device)
    chunk_frames = _chunk_frames(size)
    for start in range(0, theta.shape[0], chunk_frames):
        chunk = slice(start, start + chunk_frames)
        images = clip_images[clip_ids[chunk]].permute(0, 3, 1, 2).float()  # (B, 3, size, size)
        grid = functional.affine_grid(theta[chunk], [images.shape[0], 3, size, size], align_corners=False)
        sampled = functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        frames[chunk] = sampled.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return frames


def _chunk_frames(size: int) -> int:
    return max(1, CHUNK_PIXELS // (size * size))


def _corrupt_by_schedule(
    clean: torch.Tensor,
    segment_ids: torch.Tensor,
    segment_names: list[str],
    severity: torch.Tensor,
    max_severity: int,
    seed: int,
) -> torch.Tensor:
    """Corrupt each frame at its fractional severity by blending the two integer levels around it.

    Every level of a batch runs the registered corruption with an identically seeded generator (where
    `corrupt()` would draw fresh noise per severity), so a blend of two levels is one noise field scaled.
    """
    device = clean.device
    out = clean.clone()
    frame_names = np.array(segment_names, dtype=object)[segment_ids.numpy()]
    for name_index, name in enumerate(dict.fromkeys(segment_names)):
        if name == CLEAN or max_severity == 0:
            continue
        selected = torch.from_numpy(frame_names == name) & (severity > 0)
        indices = selected.nonzero().squeeze(1)
        chunk_frames = _chunk_frames(clean.shape[1])
        for chunk_number, start in enumerate(range(0, indices.shape[0], chunk_frames)):
            chunk_indices = indices[start : start + chunk_frames]
            batch = clean[chunk_indices.to(device)]  # (B, size, size, 3)
            batch_seed = seed * 1_000_003 + 1000 * (name_index + 1) + chunk_number
            levels = [batch]
            with torch.no_grad():
                for level in range(1, max_severity + 1):
                    generator = torch.Generator(device=device).manual_seed(batch_seed)
                    levels.append(REGISTRY[name](batch, level, generator))
            stacked = torch.stack(levels)  # (max_severity + 1, B, size, size, 3)
            chunk_severity = severity[chunk_indices].to(device)  # (B,)
            low = chunk_severity.floor().long().clamp(max=max_severity)
            high = (low + 1).clamp(max=max_severity)
            weight = (chunk_severity - low).view(-1, 1, 1, 1)
            rows = torch.arange(batch.shape[0], device=device)
            blended = torch.lerp(stacked[low, rows].float(), stacked[high, rows].float(), weight)
            out[chunk_indices.to(device)] = blended.round_().clamp_(0, 255).to(torch.uint8)
    return out


def save_stream(stream: StreamData, out_dir: str | Path, video: bool = True, fps: float = DEFAULT_FPS) -> dict[str, Path]:
    """Write frames.npy, labels.npy (int64), schedule.csv, stream.json and, with `video`, a lossless stream.mp4.

    The video is H.264 in RGB (libx264rgb, qp 0): bit-exact frames for any size, odd ones too.
    Every file is written atomically; returns the paths written, by kind.
    """
    out_dir = Path(out_dir)
    frames = stream.frames.cpu().numpy()
    written = {
        "frames": _write_npy(out_dir / "frames.npy", frames),
        "labels": _write_npy(out_dir / "labels.npy", stream.labels.cpu().numpy().astype(np.int64)),
        "schedule": write_csv(out_dir / "schedule.csv", stream.schedule),
        "meta": write_json(
            out_dir / "stream.json",
            {**stream.meta, "class_names": stream.class_names, "fps": fps, "video_codec": "libx264rgb qp=0"},
        ),
    }
    if video:
        written["video"] = atomic_write(out_dir / VIDEO_NAME, lambda tmp: write_video(tmp, frames, fps))
    return written


def write_video(path: str | Path, frames: np.ndarray, fps: float = DEFAULT_FPS) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames losslessly as H.264 RGB in an MP4 container (PyAV)."""
    av = import_av()
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        stream.options = {"qp": "0", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(path, write)


def load_stream_labels(source: str | Path) -> StreamLabels | None:
    """Ground truth for a stream source: schedule.csv (preferred) or labels.npy in the source's folder.

    For a folder source that is the folder itself; for a file (video, .npy) its parent folder. None when neither
    file exists (an unlabelled video); class names come from stream.json when present. A folder with a tta
    manifest must match it (sizes of all files, contents of the label files).
    """
    from tta_cli.outputs import verify_manifest

    source = Path(source)
    folder = source if source.is_dir() else source.parent
    schedule_path, labels_path = folder / "schedule.csv", folder / "labels.npy"
    verify_manifest(folder, hashed=["schedule.csv", "labels.npy", "stream.json"])  # a `tta stream make` folder: as written
    class_names = _read_class_names(folder / "stream.json")
    if schedule_path.is_file():
        return _read_schedule(schedule_path, class_names)
    if labels_path.is_file():
        return _read_labels_npy(labels_path, class_names)
    return None


def read_labels(path: str | Path) -> StreamLabels:
    """Ground truth the user pointed at (`--labels`): a labels.npy, a schedule.csv, or a stream folder.

    Class names come from a stream.json beside the file when there is one. Anything else is a TTAError.
    """
    path = Path(path)
    if not path.exists():
        raise TTAError(f"labels {path} do not exist; give a labels.npy, a schedule.csv or a `tta stream make` folder")
    if path.is_dir():
        truth = load_stream_labels(path)
        if truth is None:
            raise TTAError(f"folder {path} holds neither schedule.csv nor labels.npy")
        return truth
    class_names = _read_class_names(path.parent / "stream.json")
    if path.suffix.lower() == ".npy":
        return _read_labels_npy(path, class_names)
    if path.suffix.lower() == ".csv":
        return _read_schedule(path, class_names)
    raise TTAError(f"cannot read labels from {path}: use a labels.npy (one integer per frame) or a schedule.csv")


def _read_labels_npy(path: Path, class_names: list[str] | None) -> StreamLabels:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise TTAError(f"cannot read labels {path}: {' '.join(str(error).split()) or 'empty file'}") from None
    labels = as_class_indices(labels, str(path), len(class_names) if class_names else None, unknown_allowed=True)
    return StreamLabels(labels=torch.from_numpy(labels), class_names=class_names)


def _read_schedule(path: Path, class_names: list[str] | None) -> StreamLabels:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        rows.sort(key=lambda row: int(row["frame"]))
        return StreamLabels(
            labels=torch.tensor([int(row["label"]) for row in rows], dtype=torch.int64),
            clip_ids=torch.tensor([int(row["clip"]) for row in rows], dtype=torch.int64),
            corruption=[row["corruption"] for row in rows],
            severity=torch.tensor([float(row["severity"]) for row in rows], dtype=torch.float32),
            class_names=class_names,
        )
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as error:
        raise TTAError(f"{path} is not a stream schedule (columns frame, clip, label, corruption, severity): {error}") from None


def _read_class_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("class_names")
    except (OSError, ValueError, AttributeError) as error:
        raise TTAError(f"cannot read {path}: {error}") from None


@dataclass
class StreamRecipe:
    """What `tta stream make` draws and writes (make_stream's arguments, and the files' options)."""

    frames: int
    clip_length: int = 30
    corruptions: list[str] | str | None = None  # None: all
    max_severity: int = 5
    seed: int = 0
    size: int | None = None  # frame side; None: the images' own
    segment_clips: int | None = None  # None: DEFAULT_SEGMENT_CLIPS
    fps: float = DEFAULT_FPS  # written into the video
    video: bool = True  # also write stream.mp4

    def check(self) -> None:
        """What can be judged before any data is read. Without PyAV a video cannot be written: that fails here,
        before any work or file, rather than after frames.npy is already on disk."""
        from tta_cli.validation import check_seed

        if self.size is not None and self.size < 1:
            raise TTAError(f"--size must be at least 1 pixel, got {self.size}")
        if not self.fps > 0:  # the rate `tta stream run --fps native` paces by
            raise TTAError(f"--fps must be above 0, got {self.fps}")
        if self.frames < 1:
            raise TTAError(f"a stream needs at least one frame, got --frames {self.frames}")
        if self.clip_length < 1 or (self.segment_clips is not None and self.segment_clips < 1):
            raise TTAError(f"clip length and clips per corruption must be positive, got {self.clip_length} and {self.segment_clips}")
        check_seed(self.seed)
        if self.video:
            import_av("or add --no-video to write the stream as frames.npy only")


def make_stream_command(data: str, out: Path, recipe: StreamRecipe, device: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """`tta stream make`: a drifting stream from the test split of `data`, saved under `out`; returns a summary.
    The recipe is checked first (StreamRecipe.check)."""
    from tta_cli.outputs import check_space, staged_folder
    from tta_cli.validation import check_memory

    recipe.check()
    frames = recipe.frames
    images = load_split(data, "test", root=data_root)
    side = int(min(images.images.shape[1:3])) if recipe.size is None else recipe.size
    # the frames live on the device, then as a numpy copy and in the file buffers; per-frame tensors besides
    check_memory(FRAME_COPIES * frames * side * side * 3 + frames * PER_FRAME_BYTES, f"--frames {frames} at --size {side}")
    check_space(Path(out), frames * side * side * 3 * (2 if recipe.video else 1))  # frames.npy, and the video at most as much
    compute_device = resolve_device(device or "auto")
    segment_clips = DEFAULT_SEGMENT_CLIPS if recipe.segment_clips is None else recipe.segment_clips
    stream = make_stream(images, frames, clip_length=recipe.clip_length, corruptions=recipe.corruptions, max_severity=recipe.max_severity,
                         seed=recipe.seed, size=side, segment_clips=segment_clips, device=compute_device)
    with staged_folder(out, "tta stream make") as folder:
        written = {kind: out / path.name for kind, path in save_stream(stream, folder, video=recipe.video, fps=recipe.fps).items()}
    summary = {"out": str(out), "frames": len(stream), "clips": int(stream.clip_ids[-1]) + 1, "size": stream.meta["size"]}
    summary.update(corruptions=stream.meta["corruptions"], max_severity=recipe.max_severity, seed=recipe.seed, fps=recipe.fps)
    return {**summary, "device": str(compute_device), "files": {kind: str(path) for kind, path in written.items()}}

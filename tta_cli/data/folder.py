"""Class-folder trees, on disk or inside a .tar/.tar.gz: list the files of one split, then decode them.

Layouts: `<root>/<split>/<class>/<image>` or, with no train/test level, `<root>/<class>/<image>`
(used for any split); an archive may wrap either in one top folder. Hidden files, `__MACOSX` and
non-image files are ignored. JPEGs are decoded in batches by torchvision (libjpeg-turbo) on a thread
pool; PNG/BMP/WebP and anything torchvision rejects go through Pillow.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvf

from tta_cli.data.cifar_binary import CIFAR10_CLASSES
from tta_cli.errors import TTAError

try:  # batched libjpeg-turbo decoding; Pillow alone when a future torchvision drops it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test")
DECODE_CHUNK = 512
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"
IN_MEMORY_GZIP_BYTES = 256 * 2**20  # inflate smaller .tar.gz files in memory: one pass, free seeks
LAYOUT_HINT = "expected <root>/<split>/<class>/<image> or <root>/<class>/<image> with .jpg/.jpeg/.png/.bmp/.webp images"


@dataclass
class TreeFiles:
    """One split of a class-folder tree, listed but not decoded; files sorted by (label, path)."""

    location: str
    names: list[str]  # paths inside the tree, for messages
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    read_bytes: Callable[[Sequence[int]], list[bytes]]  # file contents for chosen positions


def is_tar_path(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def list_tree(path: str | Path, split: str | None) -> TreeFiles:
    """List a folder tree or a tar archive of one; `split=None` only suits a tree without train/test."""
    path = Path(path)
    if path.is_dir():
        return _list_folder(path, split)
    if path.is_file() and is_tar_path(path):
        return _list_tar(path, split)
    if path.is_file():
        raise TTAError(f"{path} is neither a folder nor a .tar/.tar.gz/.tgz archive; {LAYOUT_HINT}")
    raise TTAError(f"no such file or folder: {path}")


def list_unlabelled(path: str | Path) -> list[Path] | None:
    """The images of a folder of unlabelled images (image files at its top level and no visible subfolders), sorted
    by name; None for anything else (a class-folder tree, an archive, a file), which the class-folder readers take."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = [entry for entry in path.iterdir() if not _is_hidden(entry.name)]
    images = sorted(entry for entry in entries if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))
    if not images or any(entry.is_dir() for entry in entries):
        return None
    return images


def decode_images(blobs: Sequence[bytes], names: Sequence[str], image_size: int | None = None) -> torch.Tensor:
    """Encoded files -> uint8 (N, H, W, 3). Differing sizes are an error unless `image_size` is set,
    which resizes each image's shorter side to it (antialiased) and center-crops a square."""
    if not blobs:
        return torch.zeros((0, image_size or 0, image_size or 0, 3), dtype=torch.uint8)
    chunks = [range(start, min(start + DECODE_CHUNK, len(blobs))) for start in range(0, len(blobs), DECODE_CHUNK)]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision are deprecated")
        decoded = [image for chunk in pool.map(lambda chunk: _decode_chunk(blobs, names, chunk), chunks) for image in chunk]
    return _to_one_size(decoded, names, image_size)


def _list_folder(root: Path, split: str | None) -> TreeFiles:
    relative_paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not _is_hidden(name))
        prefix = Path(folder).relative_to(root).as_posix()
        relative_paths.extend(name if prefix == "." else f"{prefix}/{name}" for name in files)
    chosen, names, labels, class_names = _resolve_layout(relative_paths, split, str(root))

    def read_bytes(positions: Sequence[int]) -> list[bytes]:
        paths = [root / relative_paths[chosen[position]] for position in positions]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(read_file, paths))

    return TreeFiles(str(root), names, labels, class_names, read_bytes)


def _list_tar(archive: Path, split: str | None) -> TreeFiles:
    """Small gzip archives are inflated into memory once (tarfile then seeks for free); others stream."""
    try:
        in_memory = archive.stat().st_size <= IN_MEMORY_GZIP_BYTES and _starts_with(archive, GZIP_MAGIC)
        source = {"fileobj": io.BytesIO(gzip.decompress(archive.read_bytes()))} if in_memory else {"name": archive}
        with tarfile.open(mode="r:*", **source) as tar:
            members = [member for member in tar.getmembers() if member.isfile()]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        reason = " ".join(str(error).split())  # tarfile's message spans lines (one per compression it tried)
        raise TTAError(f"cannot read archive {archive} ({type(error).__name__}: {reason}); is it a complete .tar/.tar.gz?") from None
    relative_paths = [member.name.removeprefix("./") for member in members]
    chosen, names, labels, class_names = _resolve_layout(relative_paths, split, str(archive))

    def read_bytes(positions: Sequence[int]) -> list[bytes]:
        if in_memory:
            tar_bytes = source["fileobj"].getbuffer()
            spans = [(members[chosen[p]].offset_data, members[chosen[p]].size) for p in positions]
            return [bytes(tar_bytes[start : start + size]) for start, size in spans]
        wanted = sorted(positions, key=lambda position: members[chosen[position]].offset_data)  # no rewinds
        contents: dict[int, bytes] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for position in wanted:
                    contents[position] = tar.extractfile(members[chosen[position]]).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise TTAError(f"cannot read archive {archive} ({type(error).__name__}: {error})") from None
        return [contents[position] for position in positions]

    return TreeFiles(str(archive), names, labels, class_names, read_bytes)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _resolve_layout(relative_paths: Sequence[str], split: str | None, location: str) -> tuple[list[int], list[str], np.ndarray, list[str]]:
    """Pick one split's images from a tree listing -> (indices into the listing, their names,
    labels, class names). Class names come from every split folder, so labels agree across splits."""
    all_parts = (tuple(part for part in path.split("/") if part) for path in relative_paths)
    images = [
        (index, parts)
        for index, parts in enumerate(all_parts)
        if parts and parts[-1].lower().endswith(IMAGE_SUFFIXES) and not any(_is_hidden(part) for part in parts)
    ]
    if not images:
        raise TTAError(f"{location} holds no images; {LAYOUT_HINT}")
    top_folders = {parts[0] for _, parts in images}
    if len(top_folders) == 1 and top_folders.isdisjoint(SPLITS) and all(len(parts) >= 3 for _, parts in images):
        images = [(index, parts[1:]) for index, parts in images]
        top_folders = {parts[0] for _, parts in images}

    if top_folders.isdisjoint(SPLITS):
        selected = images
        class_depth_files = images
    else:
        present = sorted(top_folders & set(SPLITS))
        if split is None:
            raise TTAError(f"{location} has split folders ({', '.join(present)}); say which split to read")
        if split not in top_folders:
            raise TTAError(f"{location} has no {split}/ folder (found: {', '.join(sorted(top_folders))}); {LAYOUT_HINT}")
        selected = [(index, parts[1:]) for index, parts in images if parts[0] == split]
        class_depth_files = [(index, parts[1:]) for index, parts in images if parts[0] in SPLITS]
    for index, parts in class_depth_files:
        if len(parts) != 2:
            raise TTAError(f"{location}: {relative_paths[index]} is not at <class>/<image> depth; {LAYOUT_HINT}")

    class_names = _class_order({parts[0] for _, parts in class_depth_files})
    label_of = {name: label for label, name in enumerate(class_names)}
    selected.sort(key=lambda item: (label_of[item[1][0]], item[1][1]))
    chosen = [index for index, _ in selected]
    labels = np.array([label_of[parts[0]] for _, parts in selected], dtype=np.int64)
    return chosen, [relative_paths[index] for index in chosen], labels, class_names


def _class_order(names: set[str]) -> list[str]:
    """Sorted folder names, except CIFAR-10's ten, which keep CIFAR-10's label order."""
    return list(CIFAR10_CLASSES) if names == set(CIFAR10_CLASSES) else sorted(names)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TTAError(f"cannot read {path} ({error.strerror or error})") from None


def _decode_chunk(blobs: Sequence[bytes], names: Sequence[str], positions: range) -> list[torch.Tensor]:
    """Decode blobs[positions] -> uint8 (H, W, 3) tensors; JPEGs in one torchvision call."""
    decoded: dict[int, torch.Tensor] = {}
    jpeg_positions = [position for position in positions if blobs[position][:3] == JPEG_MAGIC]
    if jpeg_positions and decode_jpeg is not None:
        encoded = [torch.frombuffer(bytearray(blobs[position]), dtype=torch.uint8) for position in jpeg_positions]
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB)
            decoded.update((position, image.permute(1, 2, 0)) for position, image in zip(jpeg_positions, images, strict=True))
        except (RuntimeError, ValueError):
            pass  # one bad or unusual JPEG fails the call: Pillow below decodes or names each file
    return [decoded[position] if position in decoded else _decode_with_pillow(blobs[position], names[position]) for position in positions]


def _decode_with_pillow(blob: bytes, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as error:
        raise TTAError(f"cannot decode image {name} ({type(error).__name__}: {error}); remove or replace the file") from None
    return torch.from_numpy(pixels.copy())


def resize_square(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, image_size, image_size, 3): shorter side resized (antialiased), center crop."""
    if tuple(images.shape[1:3]) == (image_size, image_size):
        return images
    channels_first = images.permute(0, 3, 1, 2)  # (N, 3, H, W)
    resized = tvf.center_crop(tvf.resize(channels_first, [image_size], antialias=True), [image_size, image_size])
    return resized.permute(0, 2, 3, 1).contiguous()


def _to_one_size(decoded: list[torch.Tensor], names: Sequence[str], image_size: int | None) -> torch.Tensor:
    """Stack (H, W, 3) images; with `image_size`, resize each group of equal size at once."""
    sizes = [tuple(image.shape[:2]) for image in decoded]
    if image_size is None:
        common_size, _ = Counter(sizes).most_common(1)[0]
        for name, size in zip(names, sizes, strict=True):
            if size != common_size:
                raise TTAError(
                    f"{name} is {size[1]}x{size[0]} pixels but most images are {common_size[1]}x{common_size[0]}; "
                    "make all images one size, or set an image size to resize (shorter side) and center-crop"
                )
        return torch.stack(decoded)
    output = torch.empty((len(decoded), image_size, image_size, 3), dtype=torch.uint8)
    for size in set(sizes):
        positions = [position for position, other in enumerate(sizes) if other == size]
        group = torch.stack([decoded[position] for position in positions])
        output[torch.tensor(positions)] = resize_square(group, image_size)
    return output

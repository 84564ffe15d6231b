"""Build the embedded `cifar10-mini` archive from the CIFAR-10 JPEG archive.

Keeps the first 500 train and 100 test file names per class (sorted by name), copies their JPEG
bytes unchanged, and writes a byte-for-byte reproducible .tar.gz (fixed owners, mtimes, order).

    python scripts/make_mini.py --source ../shared/data/cifar10-jpeg.tar.gz   # with tta installed (pip install -e .)
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from collections import defaultdict
from pathlib import Path

from tta_cli.data.cifar_binary import CIFAR10_CLASSES
from tta_cli.files import write_bytes

PER_CLASS = {"train": 500, "test": 100}
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "tta_cli" / "data" / "mini" / "cifar10-mini.tar.gz"


def build_mini(source: Path) -> bytes:
    """The gzip bytes of the mini archive: `<split>/<class>/<name>.jpg`, split then class (CIFAR order) then name."""
    with tarfile.open(source, "r:*") as tar:
        members = {member.name.removeprefix("./"): member for member in tar.getmembers() if member.isfile()}
        names_by_folder: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name in members:
            split, class_name, _ = name.split("/")
            names_by_folder[split, class_name].append(name)
        chosen = [
            name
            for split, per_class in PER_CLASS.items()
            for class_name in CIFAR10_CLASSES
            for name in sorted(names_by_folder[split, class_name])[:per_class]
        ]
        in_archive_order = sorted(chosen, key=lambda name: members[name].offset_data)  # no gzip rewinds
        contents = {name: tar.extractfile(members[name]).read() for name in in_archive_order}
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as mini:
        for name in chosen:
            content = contents[name]
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            mini.addfile(info, io.BytesIO(content))
    gzip_buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gzip_buffer, mtime=0, compresslevel=9) as packed:
        packed.write(tar_buffer.getvalue())
    return gzip_buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the CIFAR-10 JPEG .tar.gz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the mini archive")
    args = parser.parse_args()
    archive = build_mini(args.source)
    write_bytes(args.output, archive)
    args.output.chmod(0o644)  # package data must be readable by every user (temp files start 0600)
    print(f"wrote {args.output} ({len(archive) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

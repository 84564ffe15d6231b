"""The output policy every command follows for what a user points `--out`, `--plot` or `--preview` at.

- Checked before any compute (`check_out_folder`, `check_out_file`): a path that is a file where a folder is wanted
  (or the reverse), a place that cannot be written, or an existing result without `--force` is a one-line error.
- A run's files appear together (`staged_folder`): they are written into a hidden temp folder beside `--out`, listed
  with their sizes and SHA-256 in `manifest.json`, and the folder is renamed into place at the end. Ctrl-C, a full disk
  or an error leave the earlier result (or nothing) under the final name, never a mix.
- `--force` replaces an existing result as a whole (the old folder is removed once the new one is in place). It only
  replaces a folder tta wrote (one with a tta manifest, or only result files: .npy/.json/.csv/...), never a folder
  holding other things, so `--out ~ --force` cannot delete a home folder.
- Readers call `verify_manifest`: a folder whose files differ from its manifest (edited, truncated, mixed) is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tta_cli.errors import TTAError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tta-output/1"
# what a manifest-less folder may hold for --force to replace it: the file types tta commands write
RESULT_SUFFIXES = {".npy", ".json", ".jsonl", ".csv", ".mp4", ".png", ".yaml", ".safetensors", ".pt"}
_HASH_CHUNK = 1 << 22


def check_out_folder(out: Path | None, force: bool, flag: str = "--out") -> None:
    """Before any compute: `out` is a folder (or can be made), writable, and empty unless `force` (see the module doc)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise TTAError(f"{flag} {out} is a file, not a folder; give a folder for the results")
    _check_writable(out, flag)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise TTAError(f"{flag} {out} already holds files; add --force to replace that result as a whole, or choose another {flag}")
        _check_replaceable(out, flag)


def check_out_file(path: Path | None, force: bool, flag: str, suffix: str = ".png") -> None:
    """Before any compute: a single output file (a PNG plot) is not a folder, has `suffix`, can be written, and is new
    unless `force`."""
    if path is None:
        return
    if path.is_dir():
        raise TTAError(f"{flag} {path} is a folder; give a file name, e.g. {path / ('plot' + suffix)}")
    if path.suffix.lower() != suffix:
        raise TTAError(f"{flag} {path} must end in {suffix} (it is written as {suffix[1:].upper()})")
    if path.exists() and not force:
        raise TTAError(f"{flag} {path} already exists; add --force to replace it, or choose another name")
    _check_writable(path, flag)


def check_space(out: Path, needed_bytes: int, flag: str = "--out") -> None:
    """Before the compute: the file system that will hold `out` has room for about `needed_bytes` (a disk that
    fills anyway is still caught by staged_folder, after the compute)."""
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if needed_bytes > free:
        raise TTAError(f"{flag} {out}: the results need about {needed_bytes / 2**20:,.1f} MiB but only {free / 2**20:,.1f} MiB are free there")


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder at or above `path`'s parent must be a writable folder (the temp file or folder
    and the final rename happen there)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TTAError(f"{flag} {path}: {ancestor} is a file, so no folder can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TTAError(f"{flag} {path}: cannot write in {ancestor} (permission denied or a read-only file system)")
    if path.exists() and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise TTAError(f"{flag} {path}: the folder is not writable (permission denied or a read-only file system)")


def _check_replaceable(out: Path, flag: str) -> None:
    if (out / MANIFEST).is_file():
        return
    foreign = [entry.name for entry in sorted(out.iterdir()) if not entry.is_file() or entry.suffix.lower() not in RESULT_SUFFIXES]
    if foreign:
        raise TTAError(
            f"{flag} {out} holds {foreign[0]!r}, which no tta command writes; --force only replaces a tta result folder, "
            f"so choose another {flag} or empty it"
        )


@contextlib.contextmanager
def staged_folder(out: Path, command: str, marks: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a hidden temp folder beside `out` to write a run's files into; on success add manifest.json and rename
    the folder onto `out` (replacing an earlier result as a whole); on any error or Ctrl-C remove it. I/O errors
    (disk full, permission) become one-line TTAErrors that say the earlier result is unchanged. `marks` go into the
    manifest (e.g. {"interrupted": True} for a stream run stopped by Ctrl-C)."""
    out = Path(out)
    # The name is chosen before the folder exists, so a Ctrl-C at any point (even inside mkdir) is cleaned up below.
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # the usual permissions (umask), unlike mkdtemp's 0700
        yield staging
        write_manifest(staging, command, marks)
        _swap_into_place(staging, out)
    except OSError as error:
        raise io_error(error, out) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def io_error(error: OSError, target: Path) -> TTAError:
    """An OSError while writing `target` as one line; the staging design means nothing partial is left there."""
    code = error.errno
    if code is None and "written" in str(error):  # numpy's short write on a full disk carries no errno
        code = errno.ENOSPC
    reason = os.strerror(code) if code else str(error)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space"}.get(code or 0, "check the path")
    return TTAError(f"cannot write {target}: {reason} ({hint}); nothing was written under {target}, an earlier result there is unchanged")


def command_line() -> str:
    return " ".join(["tta", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("tta", "cli.py") else " ".join(sys.argv)


def write_manifest(folder: Path, command: str, marks: dict[str, Any] | None = None) -> None:
    """manifest.json: every file of `folder` with its size and SHA-256, the command and the tta version."""
    from tta_cli.files import write_json

    files = {
        entry.name: {"bytes": entry.stat().st_size, "sha256": file_sha256(entry)}
        for entry in sorted(folder.iterdir())
        if entry.is_file() and entry.name != MANIFEST and not entry.name.startswith(".")
    }
    manifest = {"format": MANIFEST_FORMAT, "command": command, "argv": command_line(), "version": _version(), **(marks or {}), "files": files}
    write_json(folder / MANIFEST, manifest)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, None when it has none (an official download, an older tta); a damaged one is an error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise TTAError(f"cannot read {path}: {error}; the folder is damaged, make it again") from None
    if isinstance(manifest, dict) and "format" in manifest and manifest["format"] != MANIFEST_FORMAT:
        return None  # another tool's manifest.json: nothing tta can check
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise TTAError(f"{path} is not a tta manifest (format {MANIFEST_FORMAT}); the folder is damaged, make it again")
    return manifest


def verify_manifest(folder: Path, hashed: Iterable[str] = ()) -> dict[str, Any] | None:
    """Refuse a folder whose listed files are missing or have other sizes, or (for the names in `hashed`, the files
    about to be read) other contents. Returns the manifest, or None for a folder without one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    files = manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise TTAError(f"{path} is listed in {folder / MANIFEST} but missing: the folder is incomplete; make it again")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise TTAError(f"{path} has {size} bytes but its manifest says {entry.get('bytes')}: the file changed; make the folder again")
    for name in hashed:
        if name in files and file_sha256(folder / name) != files[name].get("sha256"):
            raise TTAError(f"{folder / name} differs from its manifest (SHA-256): the file changed after it was written; make the folder again")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tta")
    except Exception:  # an uninstalled tree
        return "unknown"

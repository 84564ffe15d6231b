"""Helpers of the bad-input suite (tests/test_bad_inputs_*.py): one-line errors, snapshots of files that must not
change, tiny result folders made once per session, tmpfs mounts for a full or read-only disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TTA = [sys.executable, "-c", "import sys; sys.argv[0] = 'tta'; from tta_cli.cli import main; sys.exit(main())"]


def invoke(args: list, stdin: bytes | None = None):
    """The Typer app in-process (stdout and stderr apart), with optional bytes on stdin."""
    from typer.testing import CliRunner

    from tta_cli.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args], input=stdin)


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    """Exit `code`, exactly one line on stderr after any progress output, starting `error: `, no traceback."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert exit_code == code, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().endswith(errors[0]), result.stderr  # the error is the last thing said, on one line
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root` (and the names beside it): content hash and mtime, to prove nothing changed."""
    files: dict[str, tuple[str, int]] = {}
    if root.is_file():
        return {root.name: (hashlib.sha256(root.read_bytes()).hexdigest(), root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    files["<beside>"] = (" ".join(sorted(entry.name for entry in root.parent.iterdir() if entry.name != "logs")), 0)
    return files


def leftovers(folder: Path) -> list[str]:
    """Temp files or folders a run left behind in `folder`."""
    return [entry.name for entry in folder.iterdir() if ".partial-" in entry.name or ".old-" in entry.name or entry.name.endswith(".tmp")]


def run_tta(args: list, prefix: list[str] = (), **kwargs) -> subprocess.CompletedProcess:
    """The `tta` program in a subprocess (this tree first on the path), after `prefix` (e.g. setpriv ...)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}
    return subprocess.run([*prefix, *TTA, *[str(arg) for arg in args]], capture_output=True, env=env, cwd=REPO, timeout=300, **kwargs)


def default_sigint() -> None:
    """In the child before exec: Ctrl-C as in a terminal. A shell's background job (`pytest &`) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler, so the interrupt tests would wait in vain."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_tta(args: list, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}
    return subprocess.Popen([*TTA, *[str(arg) for arg in args]], env=env, cwd=REPO, preexec_fn=default_sigint, **kwargs)


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """Mount a small tmpfs at `where` (root with mount(8) only; else skip the test); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of `folder` until only about `leave_bytes` are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as handle:
        with contextlib.suppress(OSError):
            handle.write(b"\0" * max(free - leave_bytes, 0))


def deny_writes(folder: Path) -> None:
    """chmod a folder read-only; skip when that does not stop this user (root)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("chmod does not deny writes to this user (root); the read-only tmpfs cases cover it")

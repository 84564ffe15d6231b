"""The installed `tta` console script, run once end to end in a fresh process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, TINY_TRAIN_ARGS


def installed_tta() -> str:
    """The `tta` script beside this interpreter (a virtualenv's bin/), else the one on PATH, else skip."""
    beside = Path(sys.executable).with_name("tta")
    found = str(beside) if beside.is_file() else shutil.which("tta")
    if found is None:
        pytest.skip("the `tta` entry point is not installed (pip install -e .)")
    return found


def test_installed_tta_shows_help_and_trains_a_tiny_model(tmp_path):
    tta = installed_tta()
    shown = subprocess.run([tta, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert all(command in shown.stdout for command in ("train", "corrupt", "adapt", "stream"))

    out = tmp_path / "run"
    trained = subprocess.run([tta, "train", str(QUICKSTART), *TINY_TRAIN_ARGS, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert (out / "model.safetensors").is_file() and (out / "model.yaml").is_file()
    assert "checkpoint:" in trained.stderr

    refused = subprocess.run([tta, "train", str(QUICKSTART), *TINY_TRAIN_ARGS, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and refused.stderr.startswith("error: ")


def test_help_into_a_pipe_that_closes_early_is_no_traceback():
    """`tta adapt --help | head -2`: the reader goes away mid-help; the program ends without a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "tta_cli.cli", "adapt", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "80"})
    process.stdout.readline()
    process.stdout.close()  # as `head` does after its lines
    _, stderr = process.communicate(timeout=120)
    assert b"Traceback" not in stderr, stderr.decode()

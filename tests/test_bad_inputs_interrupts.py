"""Bad inputs, part 4: Ctrl-C. SIGINT to the real `tta` program in the middle of each command: exit code 130 and one
line (no traceback, no interpreter abort), and nothing partial under the output's final name."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from bad_inputs import leftovers, popen_tta, snapshot
from conftest import QUICKSTART


def interrupt_when(process: subprocess.Popen, ready, limit_s: float = 120.0) -> tuple[int, str]:
    """Send SIGINT once `ready()` holds; returns the exit code and stderr."""
    deadline = time.monotonic() + limit_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"finished before it could be interrupted: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()  # leave no child running past the test
        process.communicate()
        raise AssertionError("still running 120 s after Ctrl-C") from None
    return process.returncode, stderr.decode()


def said(path: Path, text: str):
    return lambda: text in path.read_text(errors="replace") if path.exists() else False


def assert_interrupted(code: int, stderr: str) -> None:
    assert code == 130, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr


def start(args: list, tmp_path: Path, **kwargs) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "logs").mkdir(exist_ok=True)
    log = tmp_path / "logs" / "stderr.log"
    handle = open(log, "wb")  # noqa: SIM115  (the child writes it; read while it runs)
    process = popen_tta(args, stdout=subprocess.DEVNULL, stderr=handle, **kwargs)
    process.stderr = open(log, "rb")  # noqa: SIM115
    return process, log


def interrupt_leaves_nothing(args: list, tmp_path: Path, ready_text: str) -> None:
    """Run `tta ARGS --out OUT`, Ctrl-C it once `ready_text` is logged: exit 130, nothing under OUT, no leftovers."""
    out = tmp_path / "out"
    process, log = start([*args, "--out", out], tmp_path)
    code, _ = interrupt_when(process, said(log, ready_text))
    assert_interrupted(code, log.read_text())
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_in_corrupt_leaves_nothing_under_out(tmp_path):
    interrupt_leaves_nothing(["corrupt", "--corruptions", "all", "--n", "300", "--device", "cpu"], tmp_path, "tta corrupt")


def test_ctrl_c_in_corrupt_with_force_keeps_the_earlier_result(corrupt_folder, tmp_path):
    import shutil

    out = shutil.copytree(corrupt_folder, tmp_path / "c")
    before = snapshot(out)
    process, log = start(["corrupt", "--corruptions", "all", "--n", "300", "--device", "cpu", "--out", out, "--force"], tmp_path)
    code, _ = interrupt_when(process, said(log, "tta corrupt"))
    assert_interrupted(code, log.read_text())
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_ctrl_c_in_adapt_leaves_nothing_under_out(tiny_checkpoint, tmp_path):
    args = ["adapt", "--ckpt", tiny_checkpoint, "--data", "cifar10-mini", "--corruptions", "fog", "--n", "200", "--method", "ttt", "--device", "cpu"]
    interrupt_leaves_nothing(args, tmp_path, "tta adapt")


def test_ctrl_c_in_stream_make_leaves_nothing_under_out(tmp_path):
    interrupt_leaves_nothing(["stream", "make", "--frames", "6000", "--device", "cpu"], tmp_path, "tta stream make")


def test_ctrl_c_in_train_leaves_only_the_resume_state(tmp_path):
    out = tmp_path / "run"
    args = ["train", QUICKSTART, "--limit-train", "400", "--limit-test", "50", "--epochs", "50", "--device", "cpu", "--out", out]
    process, log = start(args, tmp_path)
    code, _ = interrupt_when(process, lambda: (out / "resume.pt").exists(), limit_s=240)
    assert_interrupted(code, log.read_text())
    assert sorted(path.name for path in out.iterdir()) == ["resume.pt"]


def stalled_stdin_run(tiny_checkpoint: Path, tmp_path: Path, out: Path, *extra: str) -> tuple[int, str]:
    """A stdin stream that delivers 3 frames, then stalls (the pipe stays open): Ctrl-C while the reader waits."""
    args = ["stream", "run", "-", "--stdin-size", "32x32", "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu",
            "--out", out, *extra]
    process, log = start(args, tmp_path, stdin=subprocess.PIPE)
    process.stdin.write(np.zeros((3, 32, 32, 3), dtype=np.uint8).tobytes())
    process.stdin.flush()
    ready = said(log, "tta stream run")
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # the three frames are classified; the reader now waits for a fourth
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    process.stdin.close()
    return process.returncode, log.read_text()


def test_ctrl_c_on_a_stalled_stdin_stream_exits_130_and_marks_its_partial_result(tiny_checkpoint, tmp_path):
    """Before, the decode thread blocked inside sys.stdin aborted the interpreter (exit 134)."""
    out = tmp_path / "live"
    code, stderr = stalled_stdin_run(tiny_checkpoint, tmp_path, out)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 1 <= summary["frames"] <= 3
    assert json.loads((out / "manifest.json").read_text())["interrupted"] is True


def test_ctrl_c_in_a_stream_run_never_replaces_an_earlier_complete_result(tiny_checkpoint, stream_folder, tmp_path):
    from bad_inputs import invoke

    out = tmp_path / "live"
    assert invoke(["stream", "run", stream_folder, "--ckpt", tiny_checkpoint, "--mode", "none", "--device", "cpu", "--out", out]).exit_code == 0
    before = snapshot(out)
    code, stderr = stalled_stdin_run(tiny_checkpoint, tmp_path, out, "--force")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert snapshot(out) == before and leftovers(tmp_path) == []

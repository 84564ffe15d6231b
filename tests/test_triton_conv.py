"""The Triton convolutions: their float64 checks (in a process with Triton's interpreter), the module swap,
the setting's validation, and that nothing changes on a CPU without the interpreter."""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.cli import app
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig
from tta_cli.errors import TTAError
from tta_cli.kernels import triton_conv
from tta_cli.models import build_model
from tta_cli.stream.loop import StreamSettings
from tta_cli.tasks import build_task

CHECKS = Path(__file__).with_name("triton_checks.py")


def tiny():
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(depth=8, groups=4), task), task


@pytest.mark.skipif(triton_conv.triton is None, reason="triton is not installed")
def test_triton_kernels_pass_their_float64_checks_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_swapped_convolutions_keep_their_parameters_and_state_dict():
    model, _ = tiny()
    state = copy.deepcopy(model.state_dict())
    weight = model.encoder.layer1[0].conv1.weight
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert triton_conv.use_triton_convs(model) == convs
    assert isinstance(model.encoder.layer1[0].conv1, triton_conv.TritonConv2d)
    assert model.encoder.layer1[0].conv1.weight is weight  # the same Parameter: optimizers and flat buffers still see it
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_only_convolutions_of_the_measured_channel_range_are_swapped():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 128, 1), torch.nn.Conv2d(128, 64, 3, groups=2))
    assert triton_conv.use_triton_convs(model) == 1
    assert [type(m).__name__ for m in model] == ["TritonConv2d", "Conv2d", "Conv2d"]


@pytest.mark.skipif(triton_conv.INTERPRET, reason="the interpreter runs the kernels on the CPU")
def test_without_cuda_the_triton_setting_keeps_torch_convolutions():
    model, task = tiny()
    images = torch.rand(2, 1, 3, 32, 32)
    runs = []
    for kernels in ("torch", "triton"):
        config = OnlineConfig(copies=4, lr=0.05, amp=False, conv_kernels=kernels)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(1))
        assert not any(isinstance(m, triton_conv.TritonConv2d) for m in method.model.modules())
        runs.append(torch.cat([method.adapt(image) for image in images]))
    assert torch.equal(runs[0], runs[1])


def test_an_unknown_conv_kernels_value_is_one_clear_error():
    model, task = tiny()
    with pytest.raises(TTAError, match="conv_kernels 'cutlass'"):
        OnlineTTT(model, task, OnlineConfig(conv_kernels="cutlass"), classes=10)
    with pytest.raises(TTAError, match="conv_kernels"):
        StreamSettings(conv_kernels="cutlass").validate()
    with pytest.raises(TTAError, match="conv_kernels"):
        AdaptSettings(conv_kernels="cutlass").validate()


def test_adapt_refuses_an_unknown_conv_kernels_value_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["adapt", "--ckpt", str(tmp_path / "none"), "--set", "conv_kernels=cutlass"])
    assert result.exit_code == 2
    assert "conv_kernels" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(triton_conv.INTERPRET, reason="under the interpreter every shape runs the Triton kernels, untimed")
def test_each_shape_runs_on_the_implementation_that_timed_fastest_and_is_timed_once(monkeypatch):
    """The choice logic of `_run` with stand-in implementations and timings (the real ones need a GPU)."""
    calls, timed = [], []
    speeds = {None: 3.0, (32, 32): 2.0, (64, 32): 1.0}  # seconds per call by candidate: the 64x32 tile wins

    def torch_call(x, w, stride, padding):
        calls.append("torch")
        return x

    def triton_call(x, w, stride, padding, tile=64, depth=32):
        calls.append((tile, depth))
        return x

    def fake_time(call):
        calls.clear()
        call()
        timed.append(calls[0])
        return speeds[None if calls[0] == "torch" else calls[0]]

    monkeypatch.setattr(triton_conv, "CANDIDATES", {"forward": (torch_call, triton_call, ((32, 32), (64, 32)))})
    monkeypatch.setattr(triton_conv, "_CHOSEN", {})
    monkeypatch.setattr(triton_conv, "available", lambda device: True)
    monkeypatch.setattr(triton_conv, "graph_seconds", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x, w = torch.zeros(2, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    calls.clear()
    triton_conv._run("forward", x, w, 1, 1)
    assert timed == ["torch", (32, 32), (64, 32)] and calls[-1] == (64, 32)
    triton_conv._run("forward", x, w, 1, 1)
    assert len(timed) == 3 and calls[-1] == (64, 32)  # the same shapes: no second timing
    assert list(triton_conv.choices().values()) == ["triton 64x32"]
    triton_conv._run("forward", torch.zeros(1, 3, 8, 8), w, 1, 1)
    assert len(timed) == 6 and len(triton_conv.choices()) == 2  # a new batch size is a new shape
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    triton_conv._run("forward", x, w, 2, 1)  # first seen inside a graph capture: torch's kernel, nothing cached
    assert calls[-1] == "torch" and len(timed) == 6 and len(triton_conv.choices()) == 2


@pytest.mark.skipif(triton_conv.INTERPRET, reason="under the interpreter every shape runs the Triton kernels, untimed")
def test_a_tile_that_fails_to_compile_is_skipped_with_a_warning(monkeypatch):
    def broken(x, w, stride, padding, tile=64, depth=32):
        raise RuntimeError("no such tile")

    monkeypatch.setattr(triton_conv, "CANDIDATES", {"forward": (lambda x, w, stride, padding: x, broken, ((32, 32),))})
    monkeypatch.setattr(triton_conv, "_CHOSEN", {})
    monkeypatch.setattr(triton_conv, "available", lambda device: True)

    def fake_time(call):
        call()  # the broken tile raises here, as a failed compile would
        return 1.0

    monkeypatch.setattr(triton_conv, "graph_seconds", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(triton_conv, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="tile"):
        triton_conv._run("forward", torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 3, 3), 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure at another shape: no second warning
        triton_conv._run("forward", torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 3, 3), 1, 1)
    assert list(triton_conv.choices().values()) == ["torch", "torch"]


@pytest.mark.skipif(triton_conv.INTERPRET, reason="under the interpreter every shape runs the Triton kernels, untimed")
def test_tensors_above_the_measured_range_keep_torch_convolutions_untimed(monkeypatch):
    used = []
    def implementation(name):
        return lambda dy, *args: (used.append(name), dy)[1]

    monkeypatch.setattr(triton_conv, "CANDIDATES", {"input_grad": (implementation("torch"), implementation("triton"), ((32, 32),))})
    monkeypatch.setattr(triton_conv, "available", lambda device: True)
    monkeypatch.setattr(triton_conv, "_CHOSEN", {})
    monkeypatch.setattr(triton_conv, "graph_seconds", lambda call: (call(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    dy, w = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    triton_conv._run("input_grad", dy, w, [2**16, 1, 2**8, 2**7], 1, 0)  # an input of 2^31 elements, by its shape
    triton_conv._run("input_grad", dy, w, [1, 1, 2**10, 2**10 + 1], 1, 0)  # just above MAX_ELEMENTS
    assert used == ["torch", "torch"] and not triton_conv.choices()
    triton_conv._run("input_grad", dy, w, [1, 1, 2**10, 2**10], 1, 0)  # MAX_ELEMENTS itself is timed
    assert len(triton_conv.choices()) == 1


@pytest.mark.skipif(triton_conv.INTERPRET, reason="under the interpreter every shape runs the Triton kernels, untimed")
def test_atomic_launches_are_not_tried_under_deterministic_algorithms(monkeypatch):
    """Atomic split sums add in no fixed order: a run that asks for deterministic algorithms keeps the others."""
    tried = []
    plain, atomic = (32, 32, 4), triton_conv.Launch(32, 32, 4, atomic=True)
    candidates = (lambda x, *args: x, lambda x, w, stride, padding, *launch: (tried.append(launch), x)[1], (plain, atomic))
    monkeypatch.setattr(triton_conv, "CANDIDATES", {"forward": candidates})
    monkeypatch.setattr(triton_conv, "available", lambda device: True)
    monkeypatch.setattr(triton_conv, "graph_seconds", lambda call: (call(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for deterministic, expected in ((True, [plain]), (False, [plain, atomic])):
        monkeypatch.setattr(triton_conv, "_CHOSEN", {})
        tried.clear()
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda deterministic=deterministic: deterministic)
        triton_conv._run("forward", torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 3, 3), 1, 1)
        assert sorted(tried) == sorted(expected * 2)  # checked (in threads), then timed; all time as torch's, which runs after


def test_launch_labels_name_what_differs_from_the_defaults():
    assert triton_conv.label((64, 32)) == "64x32"
    assert triton_conv.label((128, 32, 1, 2, 1)) == "128x32x1 w2 s1"
    assert triton_conv.label(triton_conv.Launch(32, 32, 4, 8, 1, True)) == "32x32x4 w8 s1 atomic"
    assert triton_conv.label(triton_conv.Launch(64, 32, 0, atomic=True)) == "64x32x0 atomic"


@pytest.mark.skipif(triton_conv.INTERPRET, reason="under the interpreter every shape runs the Triton kernels, untimed")
def test_the_choice_runs_every_launch_once_first_and_drops_those_that_disagree_with_torch(monkeypatch):
    """Each launch's first run (its compile) happens before any timing, side by side; a launch whose result is not
    torch's convolution's is never timed, so never chosen, and says so once."""
    events = []
    wrong = (64, 32)

    def triton_call(x, w, stride, padding, *launch):
        events.append(("run", launch))
        return x + 1 if launch == wrong else x.clone()

    def fake_time(call):
        events.append("timing")
        call()
        return 1.0 if events[-1] == "timing" else 0.5  # any Triton launch times faster than torch

    monkeypatch.setattr(triton_conv, "CANDIDATES", {"forward": (lambda x, *args: x.clone(), triton_call, ((32, 32), wrong))})
    monkeypatch.setattr(triton_conv, "_CHOSEN", {})
    monkeypatch.setattr(triton_conv, "available", lambda device: True)
    monkeypatch.setattr(triton_conv, "graph_seconds", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(triton_conv, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="differs from torch"):
        triton_conv._run("forward", torch.ones(1, 3, 4, 4), torch.zeros(2, 3, 3, 3), 1, 1)
    first_timing = events.index("timing")
    assert sorted(events[:first_timing]) == [("run", (32, 32)), ("run", wrong)]
    assert ("run", wrong) not in events[first_timing:]
    assert list(triton_conv.choices().values()) == ["triton 32x32"]

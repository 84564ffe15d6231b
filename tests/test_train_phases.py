"""Training phases (train/phases.py): joint, --init's two, and probing (TTT-MAE's ssl pre-training, then the main
head alone on the frozen encoder)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bad_inputs import assert_one_line_error
from conftest import QUICKSTART, TINY_TRAIN_ARGS, crash_after_epoch, run_cli

import tta_cli as tta
from tta_cli.config import InitConfig, OptimConfig, ProbeConfig, TrainConfig
from tta_cli.models import build_model
from tta_cli.train import checkpoint
from tta_cli.train.phases import phase_at, phase_lr, phases
from tta_cli.train.schedule import lr_at

OPTIM = OptimConfig(lr=0.1, epochs=10, schedule="cosine", warmup_epochs=1.0, ssl_weight=0.5)


def test_joint_training_is_one_phase_on_the_whole_schedule():
    config = TrainConfig(optim=OPTIM)
    (joint,) = phases(config)
    assert (joint.name, joint.start, joint.epochs, joint.main_weight, joint.ssl_weight) == ("joint", 0, 10, 1.0, 0.5)
    assert set(joint.trains) == {"encoder", "main_head", "ssl_head"}
    for epoch in (0.0, 0.5, 3.25, 9.9):
        assert phase_lr(OPTIM, joint, epoch) == lr_at(OPTIM, epoch)


def test_probing_pretrains_encoder_and_ssl_head_then_trains_the_main_head_alone():
    config = TrainConfig(optim=OPTIM, probe=ProbeConfig(ssl_epochs=6, main_lr=0.02))
    ssl, probe = phases(config)
    assert (ssl.name, ssl.start, ssl.epochs, ssl.lr, set(ssl.trains)) == ("ssl", 0, 6, 0.1, {"encoder", "ssl_head"})
    assert (ssl.main_weight, ssl.ssl_weight) == (0.0, 0.5)  # the main loss never reaches the encoder
    assert (probe.name, probe.start, probe.epochs, probe.lr, probe.trains) == ("probe", 6, 4, 0.02, ("main_head",))
    assert (probe.main_weight, probe.ssl_weight) == (1.0, 0.0)
    assert phase_at(config, 5) == ssl and phase_at(config, 6) == probe
    # the schedule, warm-up included, starts again in each phase
    assert phase_lr(OPTIM, probe, 6.5) == lr_at(dataclasses.replace(OPTIM, epochs=4, lr=0.02), 0.5)
    assert phase_lr(OPTIM, ssl, 2.0) == lr_at(dataclasses.replace(OPTIM, epochs=6), 2.0)


def test_init_phases_are_as_before():
    config = TrainConfig(optim=OPTIM, init=InitConfig(weights="classifier.pth", ssl_epochs=3, joint_lr=0.001))
    head, joint = phases(config)
    assert (head.name, head.epochs, head.trains, head.lr) == ("ssl-head", 3, ("ssl_head",), 0.1)
    assert (joint.name, joint.start, joint.epochs, joint.lr) == ("joint", 3, 7, 0.001)
    assert [p.name for p in phases(dataclasses.replace(config, init=InitConfig(weights="c.pth", ssl_epochs=0)))] == ["joint"]


def test_a_probe_run_moves_each_part_only_in_its_phase(tmp_path):
    """After the ssl epoch the main head is as built and the rest has moved; after the main-head epoch only the main
    head has moved since. The whole run equals one resumed at the phase change."""
    arguments = ["train", QUICKSTART, *TINY_TRAIN_ARGS, "--epochs", "2", "--set", "probe.ssl_epochs=1"]
    whole = tmp_path / "whole"
    result = run_cli([*arguments, "--out", whole])
    assert result.exit_code == 0, result.output
    final = tta.load_checkpoint(whole)
    torch.manual_seed(final.config.seed)  # the model as the run built it, before training
    initial = build_model(final.config.model, final.task).state_dict()

    out = tmp_path / "resumed"
    with crash_after_epoch(1):
        assert isinstance(run_cli([*arguments, "--out", out]).exception, RuntimeError)
    after_ssl = checkpoint.load_resume(out)["model"]

    def moved(before: dict, after: dict, part: str) -> bool:
        return any(not torch.equal(before[key], after[key]) for key in before if key.startswith(part + "."))

    trained = final.model.state_dict()
    assert not moved(initial, after_ssl, "main_head") and moved(initial, after_ssl, "encoder") and moved(initial, after_ssl, "ssl_head")
    assert moved(after_ssl, trained, "main_head") and not moved(after_ssl, trained, "encoder") and not moved(after_ssl, trained, "ssl_head")
    resumed = run_cli(["train", "--resume", "--out", out])
    assert resumed.exit_code == 0, resumed.output
    again = tta.load_checkpoint(out).model.state_dict()
    assert all(torch.equal(trained[key], again[key]) for key in trained)


@pytest.mark.parametrize("flags, message", [
    (["--set", "probe.ssl_epochs=2"], "leaves none of optim.epochs 2"),
    (["--set", "probe.ssl_epochs=1", "--set", "optim.ssl_weight=0"], "optim.ssl_weight is 0"),
    (["--set", "probe.ssl_epochs=-1"], "probe.ssl_epochs"),
    (["--set", "probe.ssl_epochs=1", "--set", "probe.main_lr=-0.1"], "probe.main_lr"),
    (["--set", "probe.ssl_epochs=1", "--set", "probe.main_lr=0"], "probe.main_lr must be above 0"),
    (["--set", "probe.ssl_epochs=1", "--init", "classifier.pth"], "use one of them"),
])
def test_bad_probe_settings_are_one_line(flags, message, tmp_path):
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--epochs", "2", *flags, "--out", tmp_path / "run"])
    assert_one_line_error(result, message)


@pytest.mark.parametrize("task", ["masked", "rotation"])
def test_the_ssl_phase_gives_the_encoder_the_ssl_loss_gradient_alone(task):
    """main_weight 0: the encoder's gradient is exactly the ssl loss's, whatever the main head predicts."""
    from tta_cli.config import ModelConfig, TaskConfig
    from tta_cli.tasks import build_task
    from tta_cli.train.loop import JointLoss

    torch.manual_seed(0)
    task_object = build_task(TaskConfig(name=task, rotation_mode="expand"))
    model = build_model(ModelConfig(depth=8), task_object).double()
    images, labels = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    ssl_inputs, ssl_targets = task_object.make_batch(images, mode="train", generator=torch.Generator().manual_seed(1))

    def encoder_gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, list(model.encoder.parameters()))

    probe_loss = JointLoss(model, task_object, 0.5, 0.0, main_weight=0.0)(images, labels, ssl_inputs, ssl_targets)[0]
    ssl_alone = 0.5 * task_object.loss(model.ssl(ssl_inputs), ssl_targets)
    joint_loss = JointLoss(model, task_object, 0.5, 0.0)(images, labels, ssl_inputs, ssl_targets)[0]
    probe, alone, joint = encoder_gradients(probe_loss), encoder_gradients(ssl_alone), encoder_gradients(joint_loss)
    for from_probe, from_ssl in zip(probe, alone, strict=True):
        torch.testing.assert_close(from_probe, from_ssl, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(p, j) for p, j in zip(probe, joint, strict=True))  # the main loss does reach it jointly

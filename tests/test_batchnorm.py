"""BatchNorm statistics in joint training: only the clean images shape them (models/batchnorm.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.models import build_model
from tta_cli.models.batchnorm import CleanStatsBatchNorm2d, statistics_from_first
from tta_cli.tasks import build_task
from tta_cli.train.loop import JointLoss


def pair(channels: int = 3) -> tuple[nn.BatchNorm2d, CleanStatsBatchNorm2d]:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels).double()
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    clean = CleanStatsBatchNorm2d(channels).double()
    clean.load_state_dict(plain.state_dict())
    return plain, clean


def test_without_statistics_rows_it_is_plain_batchnorm():
    plain, clean = pair()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        plain.train(mode), clean.train(mode)
        torch.testing.assert_close(clean(x), plain(x))
    torch.testing.assert_close(clean.running_var, plain.running_var)


def test_statistics_of_all_rows_equal_plain_batchnorm_with_its_gradients():
    plain, clean = pair()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    expected = plain(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    with statistics_from_first(clean, 6):
        actual = clean(x)
    (actual_grad,) = torch.autograd.grad(actual.square().sum(), x)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)
    torch.testing.assert_close(clean.running_mean, plain.running_mean)
    torch.testing.assert_close(clean.running_var, plain.running_var)
    assert int(clean.num_batches_tracked) == 1


def test_views_after_the_clean_rows_do_not_shape_the_statistics():
    plain, clean = pair()
    images = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    views = 10 + 5 * torch.randn(8, 3, 5, 5, dtype=torch.float64)  # a very different distribution
    with statistics_from_first(clean, 4):
        both = clean(torch.cat([images, views]))
    torch.testing.assert_close(both[:4], plain(images))
    torch.testing.assert_close(clean.running_mean, plain.running_mean)
    torch.testing.assert_close(clean.running_var, plain.running_var)
    assert clean.statistics_rows is None  # the context leaves plain BatchNorm behind


@pytest.mark.parametrize("mode", ["random", "expand"])
def test_joint_training_keeps_rotations_out_of_the_running_statistics(mode):
    """After a joint step the running statistics are those of the clean batch alone, as if no views had passed."""
    task = build_task(TaskConfig(name="rotation", rotation_mode=mode))
    model = build_model(ModelConfig(depth=8, norm="bn", split="layer1"), task, [0.5] * 3, [0.25] * 3).double().train()
    supervised = copy.deepcopy(model)
    images = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 10, (8,))
    inputs, targets = task.make_batch(images, generator=torch.Generator().manual_seed(0))
    with statistics_from_first(model, 8):
        loss, *_ = JointLoss(model, task, 1.0, 0.0, clean_statistics=True)(images, labels, inputs, targets)
    supervised(images)
    assert torch.isfinite(loss)
    encoder_norms = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    reference_norms = [m for m in supervised.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert encoder_norms
    for actual, expected in zip(encoder_norms, reference_norms, strict=True):
        torch.testing.assert_close(actual.running_mean, expected.running_mean)
        torch.testing.assert_close(actual.running_var, expected.running_var)


def test_ssl_weight_zero_trains_without_a_self_supervised_pass():
    task = build_task(TaskConfig(name="rotation", rotation_mode="expand"))
    model = build_model(ModelConfig(depth=8, norm="bn", split="layer1"), task, [0.5] * 3, [0.25] * 3).train()
    images = torch.rand(4, 3, 32, 32)
    inputs, targets = task.make_batch(images)
    loss, main_loss, ssl_loss, _ = JointLoss(model, task, 0.0, 0.0)(images, torch.zeros(4, dtype=torch.long), inputs, targets)
    loss.backward()
    assert float(ssl_loss) == 0.0
    assert all(p.grad is None for p in model.ssl_head.parameters())


def test_test_batch_statistics_cost_at_most_a_point_on_near_clean_images(tmp_path):
    """The quick start with BatchNorm, reflect-padded crops and clean-row statistics (10 epochs on the CPU): on
    severity-1 brightness of the embedded test split, `norm` stays within a point of `source`. Zero-padded
    crops made test-batch statistics cost about 3 points there."""
    import json

    from conftest import run_cli

    ckpt = tmp_path / "bn"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    result = run_cli([
        "train", recipe, "--set", "model.norm=bn", "--set", "data.pad_mode=reflect", "--set", "bn_statistics=clean", "--epochs", "10",
        "--device", "cpu", "--out", ckpt,
    ])
    assert result.exit_code == 0, result.output
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", ckpt, "--data", "cifar10-mini", "--corruptions", "brightness", "--severities", "1",
        "--method", "source,norm", "--device", "cpu", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    errors = json.loads((out / "results.json").read_text())["table"]["mean"]
    assert abs(errors["norm"] - errors["source"]) <= 1.0, errors


def test_affine_eval_batchnorm_is_eval_batchnorm_in_float64():
    from tta_cli.models.batchnorm import AffineEvalBatchNorm2d

    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(5).double().eval()
    with torch.no_grad():
        reference.weight.normal_(); reference.bias.normal_()  # noqa: E702
        reference.running_mean.normal_(); reference.running_var.uniform_(0.5, 2.0)  # noqa: E702
    affine = copy.deepcopy(reference)
    affine.__class__ = AffineEvalBatchNorm2d
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    assert torch.allclose(affine(x), reference(x), atol=1e-13, rtol=0)


def test_episodic_ttt_on_a_batchnorm_model_equals_the_one_sample_loop():
    """Eval-mode BatchNorm runs as a per-channel scale and shift under vmap (AffineEvalBatchNorm2d): the same
    results as one sample at a time through the plain BatchNorm2d, in float64."""
    from tta_cli.config import ModelConfig, TaskConfig
    from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT, adapt_sequential
    from tta_cli.models import build_model
    from tta_cli.models.batchnorm import AffineEvalBatchNorm2d
    from tta_cli.tasks import build_task

    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, width=1, split="layer2", norm="bn"), task).double().eval()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    config = EpisodicConfig(steps=2, lr=0.05, copies=4, params="encoder", chunk=3, amp=False, per_sample="vmap")
    batched = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(7)).adapt(images)
    reference = adapt_sequential(copy.deepcopy(model), task, config, images, torch.Generator().manual_seed(7))
    assert torch.allclose(batched, reference, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(batched, model(images), atol=1e-6)  # adaptation did something
    adapter = EpisodicTTT(model, task, config, torch.Generator().manual_seed(7))
    adapter.adapt(images)
    assert not any(isinstance(m, AffineEvalBatchNorm2d) for m in model.modules())  # the swap happens on a copy

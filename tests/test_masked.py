"""Masked reconstruction TTT (TTT-MAE) end to end: tiny masked checkpoints (a ResNet and a ViT) through episodic,
online and stream adaptation from the CLI, fresh masks for every view and every step, the loss on hidden patches
only, and the batched episodic path against the one-sample loop in float64 on the ViT."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, TINY_TRAIN_ARGS, run_cli

from tta_cli import load_checkpoint
from tta_cli.config import ModelConfig, OptimConfig, TaskConfig
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT, adapt_sequential
from tta_cli.models import build_model
from tta_cli.tasks import MaskedTask, build_task
from tta_cli.tasks.masked import patchify
from tta_cli.tasks.views import make_views
from tta_cli.train.loop import make_optimizer

# a 3-block ViT of width 32 for 32x32 input, split after block 2 (the ViT recipe's shape, scaled down)
TINY_VIT = ["--set", "model.backbone=vit", "--set", "model.embed_dim=32", "--set", "model.vit_depth=3", "--set", "model.vit_heads=2",
            "--set", "model.split=block2", "--set", "optim.optimizer=adamw", "--set", "optim.lr=1e-3", "--set", "optim.weight_decay=0.05"]
BACKBONES = {"resnet": [], "vit": TINY_VIT}
MASKS_OF_ONE_CALL = 4  # --copies: the views one update draws per sample


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def masked_checkpoint(request, tmp_path_factory) -> Path:
    """The quick-start recipe with the masked task (on a tiny ViT too), one epoch on 200 embedded images."""
    out = tmp_path_factory.mktemp(f"masked-{request.param}") / "run"
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--set", "task.name=masked", *BACKBONES[request.param], "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masked-c") / "c"
    result = run_cli(["corrupt", "--corruptions", "gaussian_noise", "--severities", "5", "--n", "6", "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def drawn_masks(monkeypatch) -> list[torch.Tensor]:
    """Every mask the masked task draws, in order: one (rows, patches) tensor per call."""
    masks: list[torch.Tensor] = []
    draw = MaskedTask.sample_mask

    def recording(self, *args, **kwargs):
        mask = draw(self, *args, **kwargs)
        masks.append(mask.detach().clone())
        return mask

    monkeypatch.setattr(MaskedTask, "sample_mask", recording)
    return masks


def all_distinct(rows: torch.Tensor) -> bool:
    return torch.unique(rows, dim=0).shape[0] == rows.shape[0]


@pytest.mark.parametrize("method", ["ttt", "ttt-online"])
def test_a_masked_checkpoint_adapts_with_fresh_masks_per_view_and_step(masked_checkpoint, corrupted, tmp_path, drawn_masks, method):
    out = tmp_path / "adapt"
    result = run_cli(["adapt", "--ckpt", masked_checkpoint, "--data", corrupted, "--method", f"source,{method}", "--steps", "2",
                      "--copies", MASKS_OF_ONE_CALL, "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["methods"][method]["samples"] == 6
    if method == "ttt-online":
        assert results["methods"][method]["counters"]["updates"] == 12  # 6 samples x 2 steps
    views = [mask for mask in drawn_masks if mask.shape[0] % MASKS_OF_ONE_CALL == 0 and mask.shape[0] > 0]
    assert len(views) >= 2 * (1 if method == "ttt" else 6)  # one draw per step (of the chunk, or of the sample)
    sample_views = [call[:MASKS_OF_ONE_CALL] for call in views]  # the first sample's views at each step
    assert all(all_distinct(call) for call in sample_views)  # per view
    assert not torch.equal(sample_views[0], sample_views[1])  # per step


def test_a_masked_checkpoint_runs_on_a_stream_with_fresh_masks_per_frame(masked_checkpoint, stream_folder, tmp_path, drawn_masks):
    out = tmp_path / "stream"
    result = run_cli(["stream", "run", stream_folder, "--ckpt", masked_checkpoint, "--device", "cpu", "--out", out])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapted"] == summary["frames"] == 12
    assert len(drawn_masks) >= 12
    assert all(all_distinct(mask) for mask in drawn_masks if mask.shape[0] > 1)  # the window's views
    assert not torch.equal(drawn_masks[-1][:1], drawn_masks[-2][:1])


def test_the_views_of_one_image_get_different_masks():
    task = MaskedTask(0.75, 4)
    image = torch.rand(1, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    _, first = make_views(task, image, 8, generator)
    _, second = make_views(task, image, 8, generator)
    assert all_distinct(first[..., -1]) and all_distinct(second[..., -1])
    assert not torch.equal(first[..., -1], second[..., -1])


def test_the_loss_has_no_gradient_on_visible_patches():
    task = MaskedTask(0.75, 4)
    _, targets = task.make_batch(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    outputs = torch.rand(2, 3, 32, 32, requires_grad=True)
    task.loss(outputs, targets).backward()
    per_patch = patchify(outputs.grad, 4).abs().sum(dim=-1)  # (B, L)
    hidden = targets[..., -1].bool()
    assert (per_patch[~hidden] == 0).all() and (per_patch[hidden] > 0).all()


@pytest.mark.parametrize("norm_targets", [True, False])
def test_targets_are_each_patchs_pixels_normalised_or_as_they_are(norm_targets):
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    _, targets = MaskedTask(0.75, 4, norm_targets=norm_targets).make_batch(images, generator=torch.Generator().manual_seed(0))
    pixels = patchify(images, 4)
    if norm_targets:
        pixels = (pixels - pixels.mean(-1, keepdim=True)) / pixels.std(-1, keepdim=True)
    torch.testing.assert_close(targets[..., :-1], pixels, rtol=1e-4, atol=1e-4)  # the 1e-6 under the root


def test_a_masked_recipe_with_pixel_targets_trains_and_keeps_the_setting(tmp_path):
    out = tmp_path / "run"
    arguments = ["--set", "task.name=masked", "--set", "task.norm_targets=false"]
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, *arguments, "--out", out])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out).task.norm_targets is False


@pytest.mark.parametrize("params", ["encoder", "norm"])
def test_batched_episodic_equals_the_one_sample_loop_on_a_vit_in_float64(params):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="masked", patch_size=4))
    model = build_model(ModelConfig(backbone="vit", embed_dim=32, vit_depth=3, vit_heads=2, split="block2"), task).double()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    config = EpisodicConfig(steps=3, lr=0.05, copies=4, params=params, chunk=3, amp=False, momentum=0.9)
    batched = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(7)).adapt(images)
    reference = adapt_sequential(copy.deepcopy(model), task, config, images, torch.Generator().manual_seed(7))
    assert torch.allclose(batched, reference, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(batched, model.eval()(images), atol=1e-6)  # adaptation did something


def test_adamw_decays_weight_matrices_but_not_biases_or_norms():
    model = build_model(ModelConfig(backbone="vit", embed_dim=32, vit_depth=2, vit_heads=2, split="block1"), build_task(TaskConfig(name="masked")))
    optimizer = make_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05), fused=False)
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert all(param.dim() > 1 for param in decayed["params"]) and all(param.dim() == 1 for param in undecayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))


def test_an_unknown_optimizer_is_one_line_before_any_work(tmp_path):
    result = run_cli(["train", QUICKSTART, *TINY_TRAIN_ARGS, "--set", "optim.optimizer=lion", "--out", tmp_path / "run"])
    assert result.exit_code == 2 and "unknown optim.optimizer 'lion'" in result.output
    assert not (tmp_path / "run").exists()


def test_the_gpu_script_runs_end_to_end_on_the_cpu_with_tiny_settings(tmp_path):
    """benchmarks/masked_gpu.sh with its env overrides: train, corrupt, ttt-online, ttt, and the table."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    tiny = {
        "TRAIN_ARGS": "--device cpu --epochs 1 --limit-train 128 --limit-test 20 --batch-size 64 --set compile=false --set model.depth=8",
        "CORRUPT_ARGS": "--device cpu --n 6 --corruptions gaussian_noise", "ADAPT_ARGS": "--device cpu --copies 2",
        "TTT_N": "3", "TTT_FLAGS": "--steps 1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
    }
    run = subprocess.run(["bash", "benchmarks/masked_gpu.sh", "cifar10-mini", "recipes/masked-resnet26.yaml"], cwd=repo,
                         env={**os.environ, **tiny}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [row["method"] for row in table["runs"]["online"]] == ["source", "ttt-online"]
    assert [row["method"] for row in table["runs"]["ttt"]] == ["source", "ttt"]
    assert table["runs"]["ttt"][0]["images_per_corruption"] == 3 and "test_acc" in table["trained"]
    assert (tmp_path / "out" / "ckpt" / "model.safetensors").is_file() and (tmp_path / "out" / "table.md").is_file()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("window", [False, True], ids=["copies", "window"])
@pytest.mark.parametrize("task_name", ["rotation", "masked"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_online_views_are_the_eager_views(device, task_name, window, monkeypatch):
    """The online path compiles its views with inductor (the CUDA-graph path draws from the default generator): the
    same crops, flips, rotations or masks, and window frames as eager from one seed. A compiler may reorder random
    ops (pytorch/pytorch#181136, inductor in torch 2.11 on crops + masks), so the draws must stay eager."""
    from tta_cli.adapt.methods.ttt_online import OnlineTTT
    from tta_cli.adapt.online import OnlineConfig
    from tta_cli.engine import compiled

    monkeypatch.setattr(compiled, "BACKEND", "inductor")
    torch._dynamo.reset()
    task = build_task(TaskConfig(name=task_name))
    model = build_model(ModelConfig(depth=8, groups=4), task).to(device)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    frames = (lambda: images[torch.rand(6, device=device).mul(4).long()]) if window else None
    views = []
    for compile_views in (False, True):
        method = OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=8, amp=False, compile=compile_views, cuda_graph=False),
                           classes=10, train_source=frames)
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "torch.compile failed")  # compiled, not the eager fallback
            views.append([method._make_views(images) for _ in range(2)])
    for (eager_inputs, eager_targets), (inputs, targets) in zip(*views, strict=True):
        assert torch.equal(inputs, eager_inputs)  # every draw shows in the inputs
        torch.testing.assert_close(targets, eager_targets, rtol=0, atol=1e-5)  # normalised pixels, rounded as compiled
    assert not torch.equal(views[1][0][0], views[1][1][0])  # fresh draws at the next step

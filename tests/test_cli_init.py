"""`tta train --init`: a classifier trained elsewhere (torchvision, timm, our own) gets a TTT head, then `tta adapt`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from bad_inputs import assert_one_line_error
from conftest import QUICKSTART, REPO, crash_after_epoch, run_cli
from safetensors.torch import load_file, save_file
from torch import nn

import tta_cli as tta
from tta_cli.models import build_model

INIT_RECIPE = REPO / "recipes" / "init-from-classifier.yaml"
SIZE = 16  # tiny images: the embedded 32 px data resized, so a ResNet-18 trains in seconds on a CPU
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # the normalization the classifiers below were "trained" with
TINY_INIT_ARGS = [
    "--data", "cifar10-mini", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--device", "cpu",
    "--set", f"model.img_size={SIZE}", "--set", "task.rotation_mode=random", "--set", f"init.mean={MEAN}", "--set", f"init.std={STD}",
]
FAMILIES = {
    "torchvision": ["--set", "model.backbone=torchvision_resnet", "--set", "model.torchvision_name=resnet18"],
    "timm": ["--set", "model.backbone=timm_resnet", "--set", "model.timm_name=resnet10t"],
}


def torchvision_resnet18(classes: int = 10) -> nn.Module:
    """A torchvision ResNet-18 as people train it on CIFAR: 3x3 stride-1 first convolution, no max-pool."""
    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def timm_resnet10t(classes: int = 10) -> nn.Module:
    model = timm.create_model("resnet10t", num_classes=classes)
    model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    return model


def train_briefly(model: nn.Module) -> nn.Module:
    """Two SGD steps on random images, as a stand-in for training elsewhere (BatchNorm statistics move too)."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, SIZE, SIZE)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """A briefly trained torchvision ResNet-18 (.pth) and timm ResNet-10t (.safetensors), saved as users save them."""
    folder = tmp_path_factory.mktemp("classifiers")
    torch.save(train_briefly(torchvision_resnet18()).state_dict(), folder / "resnet18.pth")
    save_file(train_briefly(timm_resnet10t()).state_dict(), folder / "resnet10t.safetensors")
    return {"torchvision": folder / "resnet18.pth", "timm": folder / "resnet10t.safetensors"}


def user_model(family: str, weights: Path) -> nn.Module:
    model = torchvision_resnet18() if family == "torchvision" else timm_resnet10t()
    model.load_state_dict(torch.load(weights) if weights.suffix == ".pth" else load_file(weights))
    return model.eval()


def largest_logit_change(family: str, weights: Path, checkpoint: Path) -> float:
    """How far the checkpoint's main head has moved from the user's classifier: the largest logit difference."""
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = tta.load_checkpoint(checkpoint).model.eval()
    with torch.no_grad():
        return (model(images) - user_model(family, weights)((images - model.mean) / model.std)).abs().max().item()


def assert_same_logits(family: str, weights: Path, checkpoint: Path) -> None:
    """The checkpoint's main head gives the user's classifier's logits, in float64."""
    images = torch.rand(4, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = user_model(family, weights).double()
    ours = tta.load_checkpoint(checkpoint).model.double()
    torch.testing.assert_close(ours.mean.flatten(), torch.tensor(MEAN, dtype=torch.float64))  # init.mean (held in float32)
    torch.testing.assert_close(ours.std.flatten(), torch.tensor(STD, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs((images - ours.mean) / ours.std), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_with_no_epochs_gives_the_classifiers_own_logits(family, classifiers, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", INIT_RECIPE, "--init", classifiers[family], *TINY_INIT_ARGS, *FAMILIES[family], "--epochs", "0", "--out", out])
    assert result.exit_code == 0, result.output
    assert_same_logits(family, classifiers[family], out)
    metrics = yaml.safe_load((out / "model.yaml").read_text())["metrics"]
    assert metrics["init_test_acc_before"] == metrics["init_test_acc_after"] == metrics["test_acc"]


def test_ssl_head_epochs_leave_the_classifier_exactly_as_given(classifiers, tmp_path):
    out = tmp_path / "run"
    arguments = ["train", INIT_RECIPE, "--init", classifiers["torchvision"], *TINY_INIT_ARGS, *FAMILIES["torchvision"]]
    result = run_cli([*arguments, "--epochs", "1", "--set", "init.ssl_epochs=1", "--set", "bn_statistics=all", "--out", out])
    assert result.exit_code == 0, result.output
    assert_same_logits("torchvision", classifiers["torchvision"], out)  # BatchNorm running statistics included
    checkpoint = tta.load_checkpoint(out)
    torch.manual_seed(checkpoint.config.seed)  # the ssl head as the run built it, before training
    initial = build_model(checkpoint.config.model, checkpoint.task).state_dict()
    trained = checkpoint.model.state_dict()
    assert any(not torch.equal(trained[key], initial[key]) for key in trained if key.startswith("ssl_head."))


@pytest.fixture(scope="module", params=list(FAMILIES))
def initialised(request, classifiers, tmp_path_factory) -> tuple[str, Path]:
    """`tta train --init`: one epoch of the ssl head alone, then one joint epoch."""
    family = request.param
    out = tmp_path_factory.mktemp(f"init-{family}") / "run"
    result = run_cli([
        "train", INIT_RECIPE, "--init", classifiers[family], *TINY_INIT_ARGS, *FAMILIES[family],
        "--epochs", "2", "--set", "init.ssl_epochs=1", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    assert "the classifier's clean accuracy:" in result.stderr
    return family, out


def test_init_metrics_say_the_clean_accuracy_before_and_after(initialised):
    _, out = initialised
    meta = yaml.safe_load((out / "model.yaml").read_text())
    metrics = meta["metrics"]
    assert metrics["epoch"] == 2 and metrics["init_test_acc_after"] == metrics["test_acc"]
    assert metrics["init_test_acc_change"] == pytest.approx(metrics["init_test_acc_after"] - metrics["init_test_acc_before"])
    assert meta["config"]["init"]["weights"].endswith((".pth", ".safetensors"))
    assert meta["normalization"]["mean"] == pytest.approx(MEAN) and meta["normalization"]["std"] == pytest.approx(STD)


def test_the_joint_epoch_trains_the_encoder_and_main_head(initialised, classifiers):
    family, out = initialised
    assert largest_logit_change(family, classifiers[family], out) > 1e-4


def test_a_compiled_run_drops_its_graphs_when_the_phase_changes(classifiers, tmp_path, monkeypatch):
    """The joint phase must not replay the ssl phase's graph, traced with a frozen encoder (make_step's docstring)."""
    resets = []
    monkeypatch.setattr(torch, "compile", lambda module, **_: module)  # the wiring, without minutes of CPU compiling
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    result = run_cli([
        "train", INIT_RECIPE, "--init", classifiers["torchvision"], *TINY_INIT_ARGS, *FAMILIES["torchvision"],
        "--epochs", "3", "--set", "init.ssl_epochs=1", "--compile", "--out", tmp_path / "run",
    ])
    assert result.exit_code == 0, result.output
    assert resets == [True]  # once: at the step from the ssl-head epoch to the joint epochs


def test_a_fused_optimizer_steps_the_joint_phase_and_resumes_anywhere_as_the_whole_run(classifiers, tmp_path, monkeypatch):
    """On a GPU the optimizer is fused, and a fused step needs momentum buffers for all of its parameters or for none:
    the first joint epoch starts with fresh optimizer state, in a whole run and in one resumed at the phase change
    alike, while a run resumed inside the joint phase keeps its momentum (both equal the whole run)."""
    from tta_cli.train import loop

    make_optimizer = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda model, optim, fused: make_optimizer(model, optim, True))
    arguments = [
        "train", INIT_RECIPE, "--init", classifiers["torchvision"], *TINY_INIT_ARGS, *FAMILIES["torchvision"],
        "--epochs", "3", "--set", "init.ssl_epochs=1",
    ]
    whole = tmp_path / "whole"
    result = run_cli([*arguments, "--out", whole])
    assert result.exit_code == 0, result.output
    assert largest_logit_change("torchvision", classifiers["torchvision"], whole) > 1e-4
    expected = load_file(whole / "model.safetensors")

    for crash_epoch in (1, 2):  # after the ssl-head epoch; after the first joint epoch
        out = tmp_path / f"resumed-{crash_epoch}"
        with crash_after_epoch(crash_epoch):
            assert isinstance(run_cli([*arguments, "--out", out]).exception, RuntimeError)
        resumed = run_cli(["train", "--resume", "--out", out])
        assert resumed.exit_code == 0, resumed.output
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(expected[name], got[name]) for name in expected), f"resumed after epoch {crash_epoch}"


def test_an_initialised_classifier_adapts_with_source_ttt_and_ttt_online(initialised, tmp_path):
    _, ckpt = initialised
    out = tmp_path / "adapt"
    result = run_cli([
        "adapt", "--ckpt", ckpt, "--data", "cifar10-mini", "--corruptions", "gaussian_noise", "--severities", "5",
        "--method", "source,ttt,ttt-online", "--n", "8", "--steps", "1", "--copies", "2", "--device", "cpu", "--out", out,
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"source", "ttt", "ttt-online"}
    assert all(0.0 <= results["table"]["mean"][method] <= 100.0 for method in results["methods"])


def test_from_classifier_in_python_trains_and_loads_the_checkpoint(classifiers, tmp_path):
    settings = {"model.backbone": "timm_resnet", "model.timm_name": "resnet10t", "model.img_size": SIZE, "task.rotation_mode": "random",
                "init.mean": MEAN, "init.std": STD, "init.ssl_epochs": 1, "optim.epochs": 1, "optim.batch_size": 32,
                "data.limit_train": 64, "data.limit_test": 32}
    checkpoint = tta.from_classifier(classifiers["timm"], tmp_path / "run", recipe=INIT_RECIPE, data="cifar10-mini", settings=settings)
    assert checkpoint.config.model.backbone == "timm_resnet" and len(checkpoint.class_names) == 10
    assert checkpoint.metrics["init_test_acc_change"] == 0.0  # the ssl head alone trained
    assert_same_logits("timm", classifiers["timm"], tmp_path / "run")
    assert tta.build_method("ttt", checkpoint, steps=1, copies=2).predict(torch.rand(2, 3, SIZE, SIZE)).shape == (2,)


def plain_preact_classifier(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A tta checkpoint's classifier as a plain network names it: stem, layer1..3, final, fc."""
    state = load_file(checkpoint / "model.safetensors")
    parts = ("encoder.", "main_head.0.")
    plain = {key.removeprefix(parts[0]).removeprefix(parts[1]): value for key, value in state.items() if key.startswith(parts)}
    plain.update({key.replace("main_head.1.1.", "fc."): value for key, value in state.items() if key.startswith("main_head.1.1.")})
    return plain


@pytest.mark.parametrize("source", ["checkpoint", "plain"])
def test_init_from_our_own_preact_resnet_keeps_its_main_head(source, tiny_checkpoint, tmp_path):
    weights = tiny_checkpoint
    if source == "plain":
        weights = tmp_path / "preact.pth"
        torch.save(plain_preact_classifier(tiny_checkpoint), weights)
    result = run_cli(["train", QUICKSTART, "--init", weights, "--limit-train", "200", "--limit-test", "50", "--epochs", "0",
                      "--device", "cpu", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    given, initialised = tta.load_checkpoint(tiny_checkpoint).model, tta.load_checkpoint(tmp_path / "run").model
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if source == "checkpoint":  # the normalization came along; for a plain state dict it is the data's, the same 200 images here
        assert torch.equal(given.mean, initialised.mean) and torch.equal(given.std, initialised.std)
    with torch.no_grad():
        torch.testing.assert_close(initialised(images), given(images))
    assert initialised.ssl(images).shape == (4, 4)


def test_torchvision_resnet_family_has_a_cifar_stem_for_small_images_and_groupnorm_on_request():
    from tta_cli.config import ModelConfig, TaskConfig
    from tta_cli.tasks import build_task

    config = ModelConfig(backbone="torchvision_resnet", torchvision_name="resnet18", norm="gn", split="layer1", img_size=SIZE)
    model = build_model(config, build_task(TaskConfig()))
    assert model.encoder.conv1.kernel_size == (3, 3) and isinstance(model.encoder.maxpool, nn.Identity)
    assert isinstance(model.encoder.bn1, nn.GroupNorm) and list(model.main_head[0]) == [model.main_head[0].layer2,
                                                                                          model.main_head[0].layer3, model.main_head[0].layer4]
    assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10) and model.ssl(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 4)


def test_a_timm_vit_classifier_becomes_the_vit_backbones_encoder_and_main_head():
    from timm.models.vision_transformer import VisionTransformer

    from tta_cli.config import ModelConfig, TaskConfig
    from tta_cli.models.attach import load_classifier
    from tta_cli.tasks import build_task

    config = ModelConfig(backbone="vit", split="block3", img_size=SIZE, patch_size=4, embed_dim=32, vit_depth=4, vit_heads=2)
    vit = VisionTransformer(img_size=SIZE, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10).eval()
    model = build_model(config, build_task(TaskConfig()), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()
    load_classifier(model, vit.state_dict(), config, "vit")
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit(images))


# --- bad inputs: one line, exit code 2, nothing written --------------------------------------------------------------


def save_torchvision(path: Path, model: nn.Module) -> Path:
    torch.save(model.state_dict(), path)
    return path


BAD_CLASSIFIERS = {
    "missing-file": (lambda folder: folder / "nope.pth", "does not exist"),
    "another-depth": (lambda folder: save_torchvision(folder / "r34.pth", torchvision.models.resnet34(num_classes=10)), "unexpected layer1.2"),
    "imagenet-stem": (lambda folder: save_torchvision(folder / "r18.pth", torchvision.models.resnet18(num_classes=10)), "3x3 stride-1"),
    "five-classes": (lambda folder: save_torchvision(folder / "r18-5.pth", torchvision_resnet18(classes=5)), "of 5 classes but the data has 10"),
    "whole-module": (lambda folder: torch.save(torchvision_resnet18(), folder / "module.pth") or folder / "module.pth", "model.state_dict()"),
    "garbage": (lambda folder: (folder / "junk.pth").write_bytes(b"\x00" * 64) and folder / "junk.pth", "damaged"),
    "no-state-dict": (lambda folder: torch.save({"epoch": 3}, folder / "epoch.pth") or folder / "epoch.pth", "holds no state dict"),
    "timm-weights-as-torchvision": (lambda folder: save_file(timm_resnet10t().state_dict(), folder / "t.safetensors") or folder / "t.safetensors",
                                    "torchvision_name=resnet18"),
}


@pytest.mark.parametrize("case", list(BAD_CLASSIFIERS))
def test_a_classifier_that_does_not_fit_is_one_line(case, tmp_path):
    make, fragment = BAD_CLASSIFIERS[case]
    weights = make(tmp_path)
    out = tmp_path / "run"
    result = run_cli(["train", INIT_RECIPE, "--init", weights, *TINY_INIT_ARGS, *FAMILIES["torchvision"], "--epochs", "1", "--out", out])
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_a_tta_checkpoint_of_another_architecture_is_one_line(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    result = run_cli(["train", QUICKSTART, "--init", ckpt, "--set", "model.depth=14", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run"])
    assert_one_line_error(result, "has model.depth=8", "set model.depth")

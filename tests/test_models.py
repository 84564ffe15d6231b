"""Backbones (preact_resnet, timm_resnet, vit) x tasks (rotation, masked): shapes, splits, training, per-sample grads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.models.preact_resnet import build_stages
from tta_cli.tasks import MaskedTask, RotationTask, build_task
from tta_cli.tasks.masked import FILL, patchify

IMG = 16
TINY = {
    "preact_resnet": ModelConfig(backbone="preact_resnet", depth=8, split="layer2", img_size=IMG),
    # timm's own tiny test model (deep stem, 373k parameters); resnet18 itself is checked once below
    "timm_resnet": ModelConfig(backbone="timm_resnet", timm_name="test_resnet", split="layer2", img_size=IMG),
    "vit": ModelConfig(backbone="vit", split="block3", img_size=IMG, patch_size=4, embed_dim=32, vit_depth=4, vit_heads=2),
}
SPLITS = {
    "preact_resnet": ["layer1", "layer2", "layer3"],
    "timm_resnet": ["layer1", "layer2", "layer3"],
    "vit": ["block1", "block2", "block3", "block4"],
}
BAD_SPLITS = {
    "preact_resnet": ["stem", "layer4", "block2"],
    "timm_resnet": ["stem", "layer4", "block2"],
    "vit": ["block0", "block5", "layer2", "block"],
}
BACKBONES = list(TINY)
TASKS = ["rotation", "masked"]


def tiny_model(backbone: str, task: str = "rotation", **changes):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY[backbone], **changes), build_task(TaskConfig(name=task)))


def images(batch: int = 2, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ssl_shape(task: str, batch: int) -> tuple[int, ...]:
    return (batch, 4) if task == "rotation" else (batch, 3, IMG, IMG)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_model_gives_class_logits_and_ssl_outputs_of_the_right_shape(backbone, task):
    model = tiny_model(backbone, task)
    main_logits, ssl_outputs = model.both(images(3))
    assert main_logits.shape == (3, 10)
    assert ssl_outputs.shape == ssl_shape(task, 3)
    assert torch.equal(model(images(3)), main_logits)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_joint_sgd_step_changes_the_encoder_and_stays_finite(backbone, task):
    model = tiny_model(backbone, task)
    ssl_task = build_task(TaskConfig(name=task))
    clean, labels = images(4), torch.tensor([0, 1, 2, 3])
    before = {name: value.detach().clone() for name, value in model.encoder.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = ssl_task.make_batch(clean, generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(clean), labels) + ssl_task.loss(model.ssl(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(value).all() for value in model.parameters())
    assert any(not torch.equal(before[name], value) for name, value in model.encoder.named_parameters())


@pytest.mark.parametrize(("backbone", "split"), [(b, s) for b in BACKBONES for s in SPLITS[b]])
def test_every_split_builds_and_runs(backbone, split):
    model = tiny_model(backbone, "masked", split=split)
    main_logits, reconstruction = model.both(images(2))
    assert main_logits.shape == (2, 10)
    assert reconstruction.shape == (2, 3, IMG, IMG)


@pytest.mark.parametrize(("backbone", "split"), [(b, s) for b in BACKBONES for s in BAD_SPLITS[b]])
def test_bad_split_is_a_user_error(backbone, split):
    with pytest.raises(TTAError, match="split"):
        tiny_model(backbone, split=split)


def test_vit_split_past_the_last_block_is_a_user_error():
    with pytest.raises(TTAError, match=r"1\.\.4"):
        tiny_model("vit", split="block5")


def test_unknown_backbone_is_a_user_error_listing_the_valid_ones():
    with pytest.raises(TTAError, match="preact_resnet, timm_resnet, torchvision_resnet, vit"):
        build_model(ModelConfig(backbone="mlp"), RotationTask())


@pytest.mark.parametrize("timm_name", ["resnet_nope", "vit_tiny_patch16_224"])
def test_unknown_timm_resnet_name_is_a_user_error_with_examples(timm_name):
    with pytest.raises(TTAError, match="resnet18"):
        tiny_model("timm_resnet", timm_name=timm_name)


def test_groupnorm_groups_that_do_not_divide_timm_channels_are_a_user_error():
    with pytest.raises(TTAError, match="divisible"):
        tiny_model("timm_resnet", groups=7)


def test_timm_resnet_rejects_a_width_multiplier():
    with pytest.raises(TTAError, match="wide_resnet50_2"):
        tiny_model("timm_resnet", width=2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_encoder_and_trunks_share_no_parameters_and_trunks_start_different(backbone):
    model = tiny_model(backbone)
    encoder, main_trunk, ssl_trunk = model.encoder, model.main_head[0], model.ssl_head[0]
    storages = [{p.data_ptr() for p in part.parameters()} for part in (encoder, main_trunk, ssl_trunk)]
    assert all(storages)
    assert not storages[0] & storages[1] and not storages[0] & storages[2] and not storages[1] & storages[2]
    main_state, ssl_state = main_trunk.state_dict(), ssl_trunk.state_dict()
    assert main_state.keys() == ssl_state.keys()
    assert any(not torch.equal(main_state[key], ssl_state[key]) for key in main_state)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_vmapped_per_sample_gradients_match_a_loop(backbone, task):
    # GroupNorm models only (all TINY configs): BatchNorm in training mode normalises with batch statistics
    # (a vmapped single sample is a batch of one, so it computes a different function) and writes its
    # running-stat buffers in place, which vmap rejects; per-sample test-time training needs GN.
    model = tiny_model(backbone, task).double()
    ssl_task = build_task(TaskConfig(name=task, rotation_mode="random"))
    ssl_path = nn.Sequential(model.encoder, model.ssl_head)
    params = {name: value.detach() for name, value in ssl_path.named_parameters()}
    inputs, targets = ssl_task.make_batch(images(2).double(), mode="adapt", generator=torch.Generator().manual_seed(0))
    inputs = model.normalize(inputs)

    def sample_loss(params, image, target):
        return ssl_task.loss(functional_call(ssl_path, params, (image[None],)), target[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    for index in range(2):
        looped = grad(sample_loss)(params, inputs[index], targets[index])
        for name in params:
            torch.testing.assert_close(per_sample[name][index], looped[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_encoder_runs_under_vmap_with_per_sample_parameters(backbone):
    model = tiny_model(backbone).double()
    params = {name: value.detach() for name, value in model.encoder.named_parameters()}
    per_sample_params = {name: torch.stack([value, value * 1.1]) for name, value in params.items()}  # (2, ...)
    batch = model.normalize(images(2).double())

    def encode(params, image):
        return functional_call(model.encoder, params, (image[None],))[0]

    batched = vmap(encode)(per_sample_params, batch)
    for index in range(2):
        one = {name: value[index] for name, value in per_sample_params.items()}
        torch.testing.assert_close(batched[index], encode(one, batch[index]))


def test_vit_features_are_a_class_token_and_patch_tokens():
    model = tiny_model("vit")
    assert model.features(images(2)).shape == (2, 1 + (IMG // 4) ** 2, 32)


def test_timm_resnet18_uses_a_cifar_stem_for_small_images_and_groupnorm_when_asked():
    model = tiny_model("timm_resnet", timm_name="resnet18", split="layer1", img_size=32)
    assert model.encoder.conv1.stride == (1, 1) and model.encoder.conv1.kernel_size == (3, 3)
    assert isinstance(model.encoder.maxpool, nn.Identity)
    assert model.features(images(1, size=32)).shape == (1, 64, 32, 32)
    assert model(images(1, size=32)).shape == (1, 10)
    norms = norm_layers(model)
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in norms)


def test_timm_resnet_deep_stem_runs_at_stride_1_for_small_images_and_batchnorm_on_request():
    model = tiny_model("timm_resnet", split="layer1")
    assert model.encoder.conv1[0].stride == (1, 1) and isinstance(model.encoder.maxpool, nn.Identity)
    assert model.features(images(1)).shape == (1, 32, IMG, IMG)
    bn_model = tiny_model("timm_resnet", norm="bn")
    assert norm_layers(bn_model) and all(isinstance(m, nn.BatchNorm2d) for m in norm_layers(bn_model))


def test_timm_resnet_keeps_the_imagenet_stem_for_large_images():
    model = tiny_model("timm_resnet", task="masked", img_size=96, split="layer3")
    assert model.encoder.conv1[0].stride == (2, 2) and isinstance(model.encoder.maxpool, nn.MaxPool2d)
    assert model.features(torch.rand(1, 3, 96, 96)).shape == (1, 192, 6, 6)
    assert model.ssl(torch.rand(1, 3, 96, 96)).shape == (1, 3, 96, 96)


def test_preact_resnet_26_has_three_stages_of_four_blocks_with_16k_32k_64k_widths():
    stages = dict(build_stages(ModelConfig(depth=26, width=2)))
    for name, width in [("layer1", 32), ("layer2", 64), ("layer3", 128)]:
        assert len(stages[name]) == 4
        assert all(block.conv2.out_channels == width for block in stages[name])


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]


def test_preact_resnet_uses_groupnorm_with_8_groups_by_default_and_batchnorm_on_request():
    gn_norms = norm_layers(nn.Sequential(*(stage for _, stage in build_stages(ModelConfig(depth=8)))))
    assert gn_norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in gn_norms)
    bn_norms = norm_layers(nn.Sequential(*(stage for _, stage in build_stages(ModelConfig(depth=8, norm="bn")))))
    assert bn_norms and all(isinstance(m, nn.BatchNorm2d) for m in bn_norms)


def rotate_once_by_index(image: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise quarter turn written as indices: out[i, j] = in[j, W-1-i]."""
    size = image.shape[-1]
    rows = torch.arange(size).view(-1, 1).expand(size, size)
    cols = torch.arange(size).view(1, -1).expand(size, size)
    return image[..., cols, size - 1 - rows]


def test_rotation_expand_mode_gives_all_four_turns_with_their_labels():
    source = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    inputs, targets = RotationTask("expand").make_batch(source)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = source
    for turns in range(4):
        torch.testing.assert_close(inputs[2 * turns : 2 * turns + 2], expected, rtol=0, atol=0)
        expected = rotate_once_by_index(expected)


def test_rotation_random_mode_rotates_each_image_by_its_own_target():
    source = images(16)
    inputs, targets = RotationTask("random").make_batch(source, generator=torch.Generator().manual_seed(1))
    assert len(set(targets.tolist())) > 1
    for image, rotated, turns in zip(source, inputs, targets.tolist(), strict=True):
        assert torch.equal(rotated, torch.rot90(image, turns, dims=(1, 2)))


def test_masked_loss_counts_only_hidden_patches():
    task = MaskedTask(0.5, 4)
    _, targets = task.make_batch(images(1), generator=torch.Generator().manual_seed(0))
    outputs = images(1, seed=1)
    hidden = targets[0, :, -1].bool()  # (L,)
    visible_index, hidden_index = int((~hidden).nonzero()[0]), int(hidden.nonzero()[0])
    base = task.loss(outputs, targets)

    def bumped(patch_index: int) -> torch.Tensor:
        row, col = divmod(patch_index, IMG // 4)
        changed = outputs.clone()
        changed[..., 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 1.0
        return task.loss(changed, targets)

    assert torch.equal(bumped(visible_index), base)
    assert not torch.equal(bumped(hidden_index), base)


@pytest.mark.parametrize("ratio", [0.75, 0.3])
def test_masks_hide_exactly_round_ratio_times_patches(ratio):
    task = MaskedTask(ratio, 4)
    inputs, targets = task.make_batch(images(5), generator=torch.Generator().manual_seed(0))
    patches = (IMG // 4) ** 2
    assert (targets[..., -1].sum(dim=1) == round(ratio * patches)).all()
    hidden = targets[..., -1].bool()
    assert (patchify(inputs, 4)[hidden] == FILL).all()
    assert torch.equal(patchify(inputs, 4)[~hidden], patchify(images(5), 4)[~hidden])


def test_masked_targets_are_normalised_per_patch():
    _, targets = MaskedTask(0.75, 4).make_batch(images(3), generator=torch.Generator().manual_seed(0))
    pixels = targets[..., :-1]  # (B, L, 4*4*3)
    torch.testing.assert_close(pixels.mean(dim=-1), torch.zeros(pixels.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels.var(dim=-1), torch.ones(pixels.shape[:2]), atol=1e-3, rtol=0)

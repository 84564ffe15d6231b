"""The published comparators (memo, eata, sar, cotta): what each paper says the method does, then one update against
a hand-written float64 step, then the guards and the CLI."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.func import functional_call

from tta_cli.adapt.methods import build_method
from tta_cli.adapt.methods.sar import sar_parameter_names
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig
from tta_cli.data.augmix import augmix
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.models.params import norm_parameter_names
from tta_cli.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the machine is shared: one thread is faster

CPU = torch.device("cpu")


def tiny_model(norm: str = "gn", dtype=torch.float64):
    """Depth-8 pre-activation ResNet, split after layer2; a BatchNorm variant gets non-trivial running statistics."""
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, width=1, split="layer2", groups=4, norm=norm), task).to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), task


def build(name: str, model, task, **own):
    return build_method(name, model, task, AdaptSettings(), 10, CPU, own)


def images(count: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def named_values(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def moved(before: dict, model) -> set[str]:
    return {name for name, param in model.named_parameters() if not torch.equal(before[name], param.detach())}


# ---- memo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_memo_leaves_the_weights_as_it_found_them(norm):
    model, task = tiny_model(norm, torch.float32)
    method = build("memo", model, task, copies=4, lr=0.1)
    before = {name: value.clone() for name, value in method.model.state_dict().items()}
    method.adapt(images(2, dtype=torch.float32))
    assert all(torch.equal(before[name], value) for name, value in method.model.state_dict().items())


def test_memo_moves_every_encoder_and_main_head_parameter_and_nothing_else():
    model, task = tiny_model()
    method = build("memo", model, task, copies=4, lr=0.1)
    method.reset = lambda: None  # keep the adapted weights to look at them
    before = named_values(method.model)
    method.adapt(images(1))
    expected = {name for name in before if name.startswith(("encoder.", "main_head."))}
    assert moved(before, method.model) == expected


def test_memo_step_is_sgd_on_the_marginal_entropy_of_the_views():
    model, task = tiny_model()
    image = images(1)
    logits = build("memo", model, task, copies=4, lr=0.05).adapt(image)

    views = augmix(image.expand(4, -1, -1, -1), torch.Generator().manual_seed(AdaptSettings().seed))
    params = {name: param for name, param in model.named_parameters() if name.startswith(("encoder.", "main_head."))}
    marginal = functional_call(model, params, (views,)).softmax(1).mean(0)  # the paper's p(y|x) over the views
    loss = -(marginal * marginal.log()).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    stepped = {name: value - 0.05 * grad for (name, value), grad in zip(params.items(), grads, strict=True)}
    assert torch.allclose(logits, functional_call(model, stepped, (image,)), atol=1e-10, rtol=1e-8)


def test_memo_lowers_the_marginal_entropy_of_the_views_it_adapts_on():
    model, task = tiny_model("bn")
    method = build("memo", model, task, copies=8, lr=0.01)
    method.reset = lambda: None
    image = images(1)
    views = augmix(image.expand(8, -1, -1, -1), torch.Generator().manual_seed(AdaptSettings().seed))
    with torch.no_grad():
        before = method.model(views).softmax(1).mean(0)
    method.adapt(image)
    with torch.no_grad():
        after = method.model(views).softmax(1).mean(0)
    assert -(after * after.log()).sum() < -(before * before.log()).sum()


def test_memo_batchnorm_mixes_running_and_test_statistics_with_prior_strength():
    model, task = tiny_model("bn")
    method = build("memo", model, task, prior_strength=16)
    layer = method.model.encoder.layer1[0].norm1
    norm = layer.norm
    x = images(1)[:, :1].expand(1, 16, 32, 32) * 3 + 1
    prior = 16 / 17
    mean = prior * norm.running_mean + (1 - prior) * x.mean((0, 2, 3))
    var = prior * norm.running_var + (1 - prior) * x.var((0, 2, 3), correction=1)
    expected = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + norm.eps).sqrt()
    expected = expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-12)


@pytest.mark.parametrize("setting, value", [("copies", 0), ("lr", -0.1), ("steps", -1), ("prior_strength", -1)])
def test_memo_bad_settings_are_one_line_errors_at_build(setting, value):
    model, task = tiny_model()
    with pytest.raises(TTAError, match=f"memo.{setting}") as error:
        build("memo", model, task, **{setting: value})
    assert "\n" not in str(error.value)


# ---- sar ----------------------------------------------------------------------------------------


def margin_for_half(model, batch: torch.Tensor) -> float:
    """An e_margin (a fraction of ln 10) that keeps about half of `batch` as reliable for the source model."""
    with torch.no_grad():
        return float(entropy(model(batch)).median()) / math.log(10) + 1e-9


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_sar_moves_only_norm_affine_parameters_below_the_deepest_stage(norm):
    model, task = tiny_model(norm)
    method = build("sar", model, task, e_margin=1.0, lr=0.1)
    before = named_values(method.model)
    method.adapt(images(8))
    assert moved(before, method.model) == {
        f"encoder.{stage}.0.{layer}.{kind}" for stage in ("layer1", "layer2") for layer in ("norm1", "norm2") for kind in ("weight", "bias")
    }  # layer3 and the final norm (the deepest stage, in the main head here) stay


@pytest.mark.parametrize("config, skipped", [
    (ModelConfig(backbone="vit", vit_depth=4, embed_dim=48, vit_heads=2, split="block2"), r"main_head\.0\.(blocks\.3\.norm[12]|norm)\."),
    (ModelConfig(backbone="timm_resnet", timm_name="resnet18", split="layer3"), r"main_head\.0\.layer4\."),
])
def test_sar_skips_the_deepest_stage_of_other_backbones_as_the_authors_do(config, skipped):
    """ViT-B's blocks 9-11 of 12 and final norm -> a ViT's last quarter of blocks and final norm; ResNet's layer4."""
    model = build_model(config, build_task(TaskConfig(name="rotation")))
    every = norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head.")
    left_out = set(every) - set(sar_parameter_names(model))
    assert left_out and left_out == {name for name in every if re.match(skipped, name)}


def test_sar_step_is_sgd_with_the_gradient_at_the_sam_perturbed_weights():
    model, task = tiny_model()
    batch = images(8)
    margin = margin_for_half(model, batch) * math.log(10)
    method = build("sar", model, task, e_margin=margin / math.log(10), lr=0.2, batch=8, rho=0.5)
    method.adapt(batch)

    names = [name for name, _ in model.named_parameters() if ".norm" in name and name.startswith("encoder.")]
    params = {name: param for name, param in model.named_parameters() if name in names}
    first = entropy(model(batch))
    reliable = first < margin
    assert 0 < reliable.sum() < 8
    grads = torch.autograd.grad(first[reliable].mean(), list(params.values()))
    scale = 0.5 / torch.cat([grad.flatten() for grad in grads]).norm()
    perturbed = {name: value + scale * grad for (name, value), grad in zip(params.items(), grads, strict=True)}
    second = entropy(functional_call(model, perturbed, (batch,)))[reliable]
    grads = torch.autograd.grad(second[second < margin].mean(), list(params.values()))
    lr = 0.2 * 8 / 32  # the authors' scaling below a batch of 32
    for (name, value), grad in zip(params.items(), grads, strict=True):
        assert torch.allclose(method.model.get_parameter(name), value - lr * grad, atol=1e-12), name


def test_sar_recovers_the_source_when_the_loss_average_falls_under_the_constant():
    model, task = tiny_model()
    method = build("sar", model, task, e_margin=1.0, lr=0.1, reset_constant=0.2)
    source = named_values(method.model)
    method.adapt(images(4))  # a real update, so that a recovery has something to undo
    assert moved(source, method.model)
    method.loss_average = None  # start the average afresh: 0.5, then 0.1 per batch
    average = None
    for batch, loss in enumerate([0.5] + [0.1] * 30):
        average = loss if average is None else 0.9 * average + 0.1 * loss
        method.track(loss)
        assert method.counters()["recoveries"] == (average < 0.2)
        if average < 0.2:
            recovered_at = batch
            break
    assert recovered_at == 14  # 0.1 + 0.4 * 0.9**14 < 0.2: several low losses in a row, not one
    assert method.loss_average is None and not moved(source, method.model)


def test_sar_with_no_reliable_sample_takes_a_zero_step_not_a_nan_one():
    """Their first loss is a mean over no samples; its gradient is zero, so the first step moves nothing."""
    model, task = tiny_model()
    method = build("sar", model, task, e_margin=1e-6, lr=0.1)
    before = named_values(method.model)
    logits = method.adapt(images(8))
    assert torch.isfinite(logits).all() and method.counters() == {"reliable_samples": 0, "recoveries": 0}
    assert not moved(before, method.model) and method.loss_average is None


def test_sar_reset_restores_the_source():
    model, task = tiny_model()
    method = build("sar", model, task, e_margin=1.0, lr=0.1)
    source = named_values(method.model)
    method.adapt(images(4))
    method.reset()
    assert not moved(source, method.model)


@pytest.mark.parametrize("setting, value", [("lr", -1e-3), ("rho", -0.05), ("e_margin", -0.4), ("reset_constant", -1), ("batch", 0),
                                            ("ema", 1.5), ("momentum", -0.1)])
def test_sar_bad_settings_are_one_line_errors_at_build(setting, value):
    model, task = tiny_model()
    with pytest.raises(TTAError, match=f"sar.{setting}") as error:
        build("sar", model, task, **{setting: value})
    assert "\n" not in str(error.value)


# ---- eata ---------------------------------------------------------------------------------------


def norm_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if ".norm" in name or ".final." in name if not name.startswith("ssl_head.")]


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_eata_moves_only_the_normalization_affine_parameters(norm):
    model, task = tiny_model(norm)
    method = build("eata", model, task, e_margin=1.0, lr=0.1, fisher_samples=4)
    before = named_values(method.model)
    method.adapt(images(8))
    assert moved(before, method.model) == set(norm_names(model))


def hand_written_eata(model, batches, margin, alpha, lr):
    """Two EATA updates from the paper's formulas; the second picks d_margin to keep about half of the reliable
    samples as non-redundant. Returns (the weights after, the d_margin picked, samples updated per batch)."""
    names = norm_names(model)
    source = {name: model.get_parameter(name).detach().clone().requires_grad_(True) for name in names}
    logits = functional_call(model, source, (batches[0],))  # the Fisher from the first batch, at the source
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, logits.argmax(1)), list(source.values()))
    fisher = [grad**2 for grad in grads]
    params, average, buffers, d_margin, updated = dict(source), None, None, None, []
    for x in batches:
        logits = functional_call(model, params, (x,))
        ent = entropy(logits)
        probs = logits.detach().softmax(1)
        selected = ent < margin
        if average is not None:
            cosine = (probs @ average) / (probs.norm(dim=1) * average.norm())
            d_margin = float(cosine.abs()[selected].median()) + 1e-9
            selected = selected & (cosine.abs() < d_margin)
        loss = (torch.exp(margin - ent.detach()) * ent)[selected].mean()
        loss = loss + alpha * sum((f * (p - s) ** 2).sum() for f, p, s in zip(fisher, params.values(), source.values(), strict=True))
        grads = torch.autograd.grad(loss, list(params.values()))
        buffers = list(grads) if buffers is None else [0.9 * b + g for b, g in zip(buffers, grads, strict=True)]
        params = {name: value - lr * b for (name, value), b in zip(params.items(), buffers, strict=True)}
        mean = probs[selected].mean(0)
        average = mean if average is None else 0.9 * average + 0.1 * mean
        updated.append(int(selected.sum()))
    return params, d_margin, updated


def test_eata_updates_equal_the_weighted_entropy_and_fisher_steps_written_out():
    model, task = tiny_model()
    batches = [images(8, seed=1), images(8, seed=2)]
    e_margin = margin_for_half(model, torch.cat(batches)) * 1.3
    expected, d_margin, updated = hand_written_eata(model, batches, e_margin * math.log(10), alpha=300.0, lr=0.1)
    method = build("eata", model, task, e_margin=e_margin, d_margin=d_margin, fisher_alpha=300.0, lr=0.1, fisher_samples=8)
    for batch in batches:
        method.adapt(batch)
    assert 0 < updated[1] < method.counters()["reliable_samples"] - updated[0]  # the redundancy filter took some
    assert method.counters()["updated_samples"] == sum(updated)
    for name, value in expected.items():
        assert torch.allclose(method.model.get_parameter(name), value, atol=1e-12), name


def test_eata_skips_high_entropy_and_redundant_samples():
    model, task = tiny_model()
    nothing_reliable = build("eata", model, task, e_margin=1e-6, fisher_samples=0)
    before = named_values(nothing_reliable.model)
    nothing_reliable.adapt(images(8))
    assert nothing_reliable.counters() == {"reliable_samples": 0, "updated_samples": 0}
    assert not moved(before, nothing_reliable.model)

    method = build("eata", model, task, e_margin=1.0, d_margin=0.4, fisher_samples=0)
    method.adapt(images(8))
    method.adapt(images(1).expand(8, -1, -1, -1))  # a softmax close to the running average: all redundant
    assert method.counters() == {"reliable_samples": 16, "updated_samples": 8}


def test_eata_without_fisher_samples_has_no_penalty_and_reset_restores_the_source():
    model, task = tiny_model()
    method = build("eata", model, task, e_margin=1.0, lr=0.1, fisher_samples=0)
    source = named_values(method.model)
    method.adapt(images(8))
    assert method.fisher is None and method.fisher_penalty() == 0.0
    average = method.average_probs.clone()
    method.reset()
    assert not moved(source, method.model)
    assert torch.equal(method.average_probs, average)  # the authors' reset keeps the moving average (eata.py:59-63)


@pytest.mark.parametrize("setting, value", [("lr", -0.1), ("e_margin", -0.4), ("d_margin", -0.1), ("fisher_samples", -1), ("batch", 0),
                                            ("fisher_alpha", -1.0), ("average", 1.5)])
def test_eata_bad_settings_are_one_line_errors_at_build(setting, value):
    model, task = tiny_model()
    with pytest.raises(TTAError, match=f"eata.{setting}") as error:
        build("eata", model, task, **{setting: value})
    assert "\n" not in str(error.value)


# ---- cotta --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_cotta_moves_the_student_and_its_teacher_but_never_the_anchor(norm):
    model, task = tiny_model(norm)
    method = build("cotta", model, task, lr=0.01, augmentations=2)
    student, teacher, anchor = named_values(method.model), named_values(method.teacher), named_values(method.anchor)
    method.adapt(images(8))
    trained = {name for name in student if name.startswith(("encoder.", "main_head."))}
    assert moved(student, method.model) == trained
    assert moved(teacher, method.teacher) == trained
    assert not moved(anchor, method.anchor)


def test_cotta_step_is_adam_on_the_teacher_cross_entropy_then_ema_then_stochastic_restore():
    model, task = tiny_model()
    batch = images(8)
    method = build("cotta", model, task, lr=0.01, anchor_threshold=0.0, restore_probability=0.5, teacher_momentum=0.9)
    logits = method.adapt(batch)

    params = {name: param for name, param in model.named_parameters() if name.startswith(("encoder.", "main_head."))}
    with torch.no_grad():
        teacher = model(batch)  # the teacher starts as the source; confident enough anchor: no augmentation
    assert torch.allclose(logits, teacher, atol=1e-12)
    loss = -(teacher.softmax(1) * functional_call(model, params, (batch,)).log_softmax(1)).sum(1).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    generator = torch.Generator().manual_seed(AdaptSettings().seed)
    for (name, value), grad in zip(params.items(), grads, strict=True):
        first, second = (1 - 0.9) * grad / (1 - 0.9), (1 - 0.999) * grad**2 / (1 - 0.999)  # Adam's bias-corrected moments
        stepped = value - 0.01 * first / (second.sqrt() + 1e-8)
        assert torch.allclose(method.teacher.get_parameter(name), 0.9 * value + 0.1 * stepped, atol=1e-12), name
        restore = torch.rand(value.shape, generator=generator) < 0.5
        assert torch.allclose(method.model.get_parameter(name), torch.where(restore, value, stepped), atol=1e-12), name


def test_cotta_averages_the_teacher_over_augmentations_when_the_anchor_is_unsure():
    from tta_cli.data.cotta_augment import cotta_augment

    model, task = tiny_model()
    batch = images(4)
    method = build("cotta", model, task, anchor_threshold=1.0, augmentations=3)
    logits = method.adapt(batch)
    generator = torch.Generator().manual_seed(AdaptSettings().seed)
    with torch.no_grad():
        expected = torch.stack([model(cotta_augment(batch, generator)) for _ in range(3)]).mean(0)
    assert torch.allclose(logits, expected, atol=1e-12)
    assert method.counters() == {"augmented_batches": 1}


def test_cotta_restores_about_the_stated_fraction_of_weights_and_reset_restores_all():
    model, task = tiny_model(dtype=torch.float32)
    method = build("cotta", model, task, lr=0.01, anchor_threshold=0.0, restore_probability=0.3)
    source = [param.detach().clone() for param in method.params]
    method.adapt(images(8, dtype=torch.float32))
    same = sum(int((param == value).sum()) for param, value in zip(method.params, source, strict=True))
    assert 0.27 < same / sum(value.numel() for value in source) < 0.33
    method.reset()
    assert all(torch.equal(param, value) for param, value in zip(method.params, source, strict=True))
    assert all(torch.equal(param, value) for param, value in zip(method.teacher_params, source, strict=True))


@pytest.mark.parametrize("setting, value", [("lr", -1e-3), ("restore_probability", 1.5), ("anchor_threshold", -0.1),
                                            ("augmentations", 0), ("teacher_momentum", 2.0), ("beta", 1.5), ("batch", 0)])
def test_cotta_bad_settings_are_one_line_errors_at_build(setting, value):
    model, task = tiny_model()
    with pytest.raises(TTAError, match=f"cotta.{setting}") as error:
        build("cotta", model, task, **{setting: value})
    assert "\n" not in str(error.value)


# ---- the papers' shared claim: each update lowers the loss of the batch it updates on (BatchNorm models) --------


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_entropy_methods_lower_the_entropy_of_the_batch_they_update_on(name):
    model, task = tiny_model("bn")
    method = build(name, model, task, e_margin=1.0, lr=0.05, **({"fisher_samples": 0} if name == "eata" else {}))
    batch = images(16)
    before = entropy(method.adapt(batch)).mean()  # predictions come before the update
    with torch.no_grad():
        after = entropy(method.model(batch)).mean()
    assert after < before


def test_cotta_student_moves_towards_the_augmentation_averaged_teacher():
    """(Without augmentation the first teacher is the student itself, whose cross-entropy gradient is zero.)"""
    model, task = tiny_model("bn")
    method = build("cotta", model, task, lr=1e-4, anchor_threshold=1.0, augmentations=4, restore_probability=0.0)
    batch = images(16)

    def cross_entropy_to(teacher_logits):
        with torch.no_grad():
            return -(teacher_logits.softmax(1) * method.model(batch).log_softmax(1)).sum(1).mean()

    teacher_logits = method.pseudo_labels(batch)
    before = cross_entropy_to(teacher_logits)
    method.generator.manual_seed(AdaptSettings().seed)  # the same views again inside adapt
    assert torch.equal(method.adapt(batch), teacher_logits)
    assert cross_entropy_to(teacher_logits) < before

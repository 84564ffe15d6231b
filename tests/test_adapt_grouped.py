"""Per-sample weights folded into grouped convolutions equal vmap's per-sample weights and the sequential loop."""

import copy

import pytest
import torch

from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.engine import grouped
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT, adapt_sequential
from tta_cli.engine.per_sample import PerSampleModel
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks import build_task
from tta_cli.tasks.views import grouped_views


def tiny_model(task_name="rotation", norm="gn", dtype=torch.float64):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name=task_name, patch_size=4))
    model = build_model(ModelConfig(depth=8, width=1, split="layer2", groups=4, norm=norm), task)
    return model.to(dtype).eval(), task


@pytest.mark.parametrize(("params", "channels_last"), [("encoder", False), ("encoder+ssl", False), ("norm", False), ("encoder", True)])
def test_grouped_gradients_and_predictions_equal_vmap_on_distinct_weights(params, channels_last):
    """Every sample on its own (perturbed) weights: a mix-up between samples' groups would show here."""
    model, task = tiny_model()
    names = adapted_parameter_names(model, params)
    reference = PerSampleModel(model, task, names)
    folded = grouped.GroupedPerSampleModel(model, task, names, channels_last=channels_last)
    generator = torch.Generator().manual_seed(5)
    weights = [p + 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in reference.repeated_source(3)]
    inputs, targets = grouped_views(task, torch.rand(3, 3, 32, 32, dtype=torch.float64), 4, torch.Generator().manual_seed(2))
    expected, expected_loss = reference.gradients(weights, inputs, targets)
    got, got_loss = folded.gradients(weights, inputs, targets)
    assert all(torch.allclose(g, e, atol=1e-12, rtol=1e-9) for g, e in zip(got, expected, strict=True))
    assert torch.allclose(got_loss, expected_loss, atol=1e-12)
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(folded.predict(weights, images), reference.predict(weights, images), atol=1e-12)


@pytest.mark.parametrize("skip_above", [None, 0.3])
def test_grouped_episodic_equals_sequential(skip_above):
    model, task = tiny_model()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    config = EpisodicConfig(
        steps=3, lr=0.05, copies=4, params="encoder+ssl", chunk=3, amp=False, momentum=0.9, skip_above=skip_above, per_sample="grouped"
    )
    method = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(7))
    batched = method.adapt(images)
    assert isinstance(method._functions, grouped.GroupedPerSampleModel)
    reference = adapt_sequential(copy.deepcopy(model), task, config, images, torch.Generator().manual_seed(7))
    assert torch.allclose(batched, reference, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(batched, model(images), atol=1e-6)  # adaptation did something


@pytest.mark.parametrize(("task_name", "norm"), [("masked", "gn"), ("rotation", "bn")])
def test_models_the_fold_does_not_know_keep_vmap(task_name, norm):
    model, task = tiny_model(task_name, norm)
    assert not grouped.supports(model, task)
    functions = grouped.per_sample_model(model, task, adapted_parameter_names(model, "encoder"), EpisodicConfig(per_sample="grouped"))
    assert type(functions) is PerSampleModel


def test_auto_folds_on_the_cpu():
    model, task = tiny_model()
    functions = grouped.per_sample_model(model, task, adapted_parameter_names(model, "encoder"), EpisodicConfig())
    assert EpisodicConfig().per_sample == "auto" and isinstance(functions, grouped.GroupedPerSampleModel)


def test_unknown_per_sample_is_a_user_error():
    model, task = tiny_model()
    with pytest.raises(TTAError, match="per_sample"):
        EpisodicTTT(model, task, EpisodicConfig(per_sample="loops"))

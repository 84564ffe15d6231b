"""Stream orders yield the documented sequences; the comparators (source, norm, tent) behave as documented."""


import pytest
import torch

from tta_cli.adapt.methods import build_method
from tta_cli.adapt.methods.base import Method
from tta_cli.adapt.orders import build_order
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig
from tta_cli.data.imageset import ImageSet, mix_classes
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.models.params import norm_parameter_names
from tta_cli.tasks import build_task

CLASSES = [f"c{i}" for i in range(4)]


def shifted_sets(corruptions=("fog", "snow"), severities=(1, 2, 3), size=12) -> list[ImageSet]:
    generator = torch.Generator().manual_seed(0)
    sets = []
    for corruption in corruptions:
        for severity in severities:
            labels = torch.randint(0, len(CLASSES), (size,), generator=generator)
            images = torch.zeros(size, 4, 4, 3, dtype=torch.uint8)
            sets.append(ImageSet(images, labels, CLASSES, {"corruption": corruption, "severity": severity}))
    return sets


def test_per_corruption_is_each_set_in_order_with_a_reset_between():
    sets = shifted_sets()
    segments = build_order(sets, "per-corruption")
    assert [s.label for s in segments] == ["fog-1", "fog-2", "fog-3", "snow-1", "snow-2", "snow-3"]
    assert torch.equal(torch.cat([s.indices for s in segments]), torch.arange(72))


def test_continual_is_every_set_in_a_row_without_a_reset():
    segments = build_order(shifted_sets(), "continual")
    assert len(segments) == 1 and torch.equal(segments[0].indices, torch.arange(72))


def test_mixed_is_a_seeded_permutation_of_everything():
    sets = shifted_sets()
    first, again, other = (build_order(sets, "mixed", seed=s)[0].indices for s in (0, 0, 1))
    assert sorted(first.tolist()) == list(range(72)) and not torch.equal(first, torch.arange(72))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_gradual_climbs_severity_one_to_five_and_back_per_corruption():
    sets = shifted_sets(severities=(1, 2, 3, 4, 5), size=18)
    indices = build_order(sets, "gradual")[0].indices
    severity_of = torch.cat([torch.full((len(s),), s.meta["severity"]) for s in sets])
    corruption_of = torch.cat([torch.full((len(s),), i // 5) for i, s in enumerate(sets)])
    walk = list(zip(corruption_of[indices].tolist(), severity_of[indices].tolist(), strict=True))
    ladder = [step for i, step in enumerate(walk) if i == 0 or step != walk[i - 1]]
    assert ladder == [(c, s) for c in (0, 1) for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert corruption_of[indices].tolist() == sorted(corruption_of[indices].tolist())  # fog first, then snow
    assert len(set(indices.tolist())) == len(indices)  # no sample twice


def test_correlated_sorts_labels_within_each_set():
    sets = shifted_sets()
    labels = torch.cat([s.labels for s in sets])
    segments = build_order(sets, "correlated")
    assert len(segments) == len(sets)
    for segment in segments:
        in_order = labels[segment.indices]
        assert torch.equal(in_order, torch.sort(in_order).values)


def test_dirichlet_keeps_every_sample_and_small_concentration_groups_labels():
    sets = shifted_sets(corruptions=("fog",), severities=(5,), size=400)
    labels = sets[0].labels

    def switches(concentration: float) -> int:
        order = build_order(sets, "correlated", seed=3, dirichlet=concentration)[0].indices
        assert sorted(order.tolist()) == list(range(400))
        return int((labels[order][1:] != labels[order][:-1]).sum())

    assert switches(0.01) < 0.7 * switches(1000.0)  # large D is close to i.i.d. (~300 switches of 4 classes)


def test_unknown_order_is_a_user_error():
    with pytest.raises(TTAError, match="unknown order"):
        build_order(shifted_sets(), "sideways")


def test_mix_classes_shuffles_class_grouped_sets_and_keeps_mixed_ones():
    grouped = ImageSet(torch.zeros(8, 2, 2, 3, dtype=torch.uint8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), CLASSES)
    mixed, order = mix_classes(grouped, seed=0)
    assert sorted(order) == list(range(8)) and torch.equal(mixed.labels, grouped.labels[order])
    again, none = mix_classes(mixed, seed=0)
    assert none is None and again is mixed


def tiny(norm: str):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(depth=8, norm=norm, groups=4, num_classes=4), task)


def comparator(name: str, model, own: dict | None = None) -> Method:
    """Method `name` on a copy of `model` on the CPU, with the shared defaults."""
    return build_method(name, model, None, AdaptSettings(), len(CLASSES), torch.device("cpu"), own)


def test_source_model_is_the_checkpoint_in_eval_mode():
    model = tiny("gn")
    images = torch.rand(5, 3, 32, 32)
    assert torch.allclose(comparator("source", model).adapt(images), model.eval()(images))


def test_norm_uses_test_batch_statistics_and_refuses_groupnorm():
    model = tiny("bn")
    images = torch.rand(6, 3, 32, 32) * 0.3 + 0.6  # statistics far from the running ones
    adapted = comparator("norm", model).adapt(images)
    assert not torch.allclose(adapted, model.eval()(images), atol=1e-4)
    assert torch.allclose(adapted, model.train()(images), atol=1e-5)  # batch statistics, as in training mode
    with pytest.raises(TTAError, match="BatchNorm"):
        comparator("norm", tiny("gn"))


def test_tent_moves_only_normalization_affine_parameters():
    model = tiny("bn")
    tent = comparator("tent", model, {"lr": 1e-2})
    tent.adapt(torch.rand(8, 3, 32, 32))
    before, after = dict(model.named_parameters()), dict(tent.model.named_parameters())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    allowed = set(norm_parameter_names(model.encoder, "encoder.") + norm_parameter_names(model.main_head, "main_head."))
    assert moved and moved <= allowed


class NaNAfterTwo(Method):
    """A method whose predictions turn NaN from the third sample on, as diverged updates leave them."""

    name, episodic, default_batch = "diverging", True, 2

    def reset(self) -> None:
        self.seen = 0

    def counters(self) -> dict:
        return {}

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], len(CLASSES))
        rows = torch.arange(self.seen, self.seen + images.shape[0])
        self.seen += images.shape[0]
        return logits.masked_fill((rows >= 2)[:, None], float("nan"))


class ConstantLogits(NaNAfterTwo):
    """Zero logits for every sample, two samples per batch."""

    name = "constant"

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], len(CLASSES))


def test_a_run_whose_predictions_turn_nan_is_an_error_not_a_table():
    from tta_cli.adapt.runner import run_method

    sets = shifted_sets(("fog",), (1,), size=5)
    with pytest.raises(TTAError, match="3 of 5 predictions were NaN or infinite"):
        method = NaNAfterTwo(tiny("gn"), None, None, AdaptSettings(), len(CLASSES), torch.device("cpu"))
        run_method(method, sets, build_order(sets, "per-corruption"), device=torch.device("cpu"))


def test_combine_seeds_gives_the_mean_and_sample_std_per_set():
    from tta_cli.adapt.runner import RunResult, combine_seeds

    def run(errors):
        return RunResult("ttt", errors, torch.zeros(2, dtype=torch.long), 1.0, 10, {"updates": 5}, "float32")

    combined = combine_seeds([run([10.0, 20.0]), run([14.0, 20.0]), run([12.0, 26.0])])
    assert combined.errors == pytest.approx([12.0, 22.0])
    assert combined.errors_std == pytest.approx([2.0, 12 ** 0.5])
    assert combined.seed_errors == [[10.0, 20.0], [14.0, 20.0], [12.0, 26.0]]
    assert combined.counters == {"updates": 15} and combined.samples == 30
    assert combine_seeds([run([10.0, 20.0])]).errors_std == [0.0, 0.0]


def test_the_steady_rate_leaves_out_the_first_batch_which_compiles():
    from tta_cli.adapt.runner import RunResult, combine_seeds, run_method

    def run(first_batch):
        return RunResult("ttt", [1.0], torch.zeros(1, dtype=torch.long), 10.0, 100, {}, "float32", first_batch=first_batch)

    assert run((8.0, 20)).steady_samples_per_s == pytest.approx(80 / 2.0)
    assert run((10.0, 100)).steady_samples_per_s is None and run(None).steady_samples_per_s is None  # one batch only
    combined = combine_seeds([run((8.0, 20)), run((8.0, 20))])  # each seed compiles again: both first batches count
    assert combined.first_batch == (16.0, 40) and combined.steady_samples_per_s == pytest.approx(160 / 4.0)
    assert combine_seeds([run((8.0, 20)), run(None)]).first_batch is None

    sets = shifted_sets(("fog", "snow"), (1,), size=5)
    method = ConstantLogits(tiny("gn"), None, None, AdaptSettings(), len(CLASSES), torch.device("cpu"))
    result = run_method(method, sets, build_order(sets, "per-corruption"), device=torch.device("cpu"))
    seconds, samples = result.first_batch
    assert samples == method.default_batch and 0 < seconds <= result.seconds and result.steady_samples_per_s > 0

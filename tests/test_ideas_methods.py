"""The five ideas of issue 23 against what they promise: test-time augmentation, nearest-neighbour TTT, the
adapted-weight cache, low-rank adapters and the forgetting gate (float64 where results must be equal)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tta_cli.adapt.methods import build_method
from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.config import AdaptSettings, ModelConfig, TaskConfig
from tta_cli.data.imageset import ImageSet
from tta_cli.engine.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.models.adapters import adapter_parameter_names, add_adapters, merged_state
from tta_cli.tasks import build_task
from tta_cli.train.embedding_index import EmbeddingIndex

CPU = torch.device("cpu")


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(depth=8, groups=4), task).to(dtype).eval(), task


def settings(**values) -> AdaptSettings:
    return AdaptSettings(**{"copies": 4, "lr": 0.05, "per_sample": "vmap", **values})


# ---- ttaug and --views -------------------------------------------------------------------------------------------


def test_ttaug_with_one_view_and_no_augmentation_equals_source():
    model, task = tiny()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    ttaug = build_method("ttaug", model, task, settings(), 10, CPU, {"views": 1, "augment": False})
    source = model(images).log_softmax(1)
    assert torch.allclose(ttaug.adapt(images), source, atol=1e-12)


def test_ttaug_without_augmentation_equals_source_for_any_number_of_views():
    model, task = tiny()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ttaug = build_method("ttaug", model, task, settings(), 10, CPU, {"views": 5, "augment": False})
    assert torch.allclose(ttaug.adapt(images), model(images).log_softmax(1), atol=1e-12)


def test_ttaug_averages_the_softmax_of_the_sample_and_its_crop_flip_views():
    from tta_cli.adapt.views import prediction_views

    model, task = tiny()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ttaug = build_method("ttaug", model, task, settings(seed=3), 10, CPU, {"views": 4})
    views = prediction_views(images, 4, task.view_pad_mode, torch.Generator().manual_seed(3))
    assert torch.equal(views[::4], images)  # view 0 is the sample itself
    expected = model(views).softmax(1).view(2, 4, 10).mean(1).log()
    assert torch.allclose(ttaug.adapt(images), expected, atol=1e-12)


def test_views_flag_averages_an_episodic_method_over_its_views_and_refuses_online_ones():
    model, task = tiny()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    averaged = build_method("source", model, task, settings(views=3, seed=1), 10, CPU)
    from tta_cli.adapt.views import prediction_views

    views = prediction_views(images, 3, task.view_pad_mode, torch.Generator().manual_seed(2))
    assert torch.allclose(averaged.adapt(images), model(views).softmax(1).view(2, 3, 10).mean(1).log(), atol=1e-12)
    with pytest.raises(TTAError, match="online"):
        build_method("ttt-online", model, task, settings(views=3), 10, CPU)


# ---- adapters ----------------------------------------------------------------------------------------------------


def test_zero_adapters_leave_the_outputs_unchanged():
    model, task = tiny()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    adapted = copy.deepcopy(model)
    assert add_adapters(adapted, rank=4) > 0
    assert torch.equal(adapted(images), model(images))
    assert torch.equal(adapted(images, head="ssl"), model(images, head="ssl"))


def test_adapters_are_the_only_parameters_ttt_moves_and_fold_back_into_the_convolutions():
    model, task = tiny()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ttt = build_method("ttt", model, task, settings(params="adapters", steps=2), 10, CPU)
    assert ttt.episodes.names == adapter_parameter_names(ttt.model)
    assert not torch.allclose(ttt.adapt(images), model(images), atol=1e-6)  # the adapters learned something
    online = build_method("ttt-online", model, task, settings(params="adapters"), 10, CPU)
    online.adapt(images[:1])
    assert any(float(p.detach().abs().sum()) > 0 for name, p in online.model.named_parameters() if name.endswith(".up"))
    folded = copy.deepcopy(model)
    folded.load_state_dict(merged_state(online.model))
    assert torch.allclose(folded(images), online.model(images), atol=1e-10)
    online.reset()
    assert all(float(p.detach().abs().sum()) == 0 for name, p in online.model.named_parameters() if name.endswith(".up"))


# ---- the forgetting gate -----------------------------------------------------------------------------------------


def online(model, task, **config):
    return OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=4, lr=0.05, amp=False, momentum=0.9, **config),
                     classes=10, generator=torch.Generator().manual_seed(5))


def test_forget_one_equals_source():
    model, task = tiny()
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    forgetful = online(model, task, forget=1.0)
    assert torch.allclose(forgetful.adapt_sequence(images), model(images), atol=1e-12)
    assert torch.equal(forgetful.weights.flat, forgetful.source)


def test_forget_zero_equals_plain_online_ttt():
    model, task = tiny()
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    plain = online(model, task).adapt_sequence(images)
    assert torch.equal(online(model, task, forget=0.0).adapt_sequence(images), plain)
    assert not torch.allclose(plain, model(images), atol=1e-6)


def test_forget_decays_the_weights_toward_the_source_after_the_momentum_step():
    model, task = tiny()
    image = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    plain, forgetful = online(model, task), online(model, task, forget=0.25)
    plain.adapt(image)
    forgetful.adapt(image)
    source = plain.source
    assert torch.allclose(forgetful.weights.flat, 0.75 * plain.weights.flat + 0.25 * source, atol=1e-12)


# ---- the adapted-weight cache ------------------------------------------------------------------------------------


def episodic(model, task, cache=None):
    config = EpisodicConfig(steps=2, lr=0.05, copies=4, chunk=2, amp=False, per_sample="vmap", cache=cache)
    return EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator().manual_seed(7))


def test_cache_above_one_never_hits_and_equals_plain_episodic_ttt():
    model, task = tiny()
    images = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    cached = episodic(model, task, cache=1.5)
    logits = torch.cat([cached.adapt(images[:3]), cached.adapt(images[3:])])
    plain = episodic(model, task)
    assert torch.equal(logits, torch.cat([plain.adapt(images[:3]), plain.adapt(images[3:])]))
    assert cached.counters()["cache_hits"] == 0 and cached.counters()["cache_lookups"] == 5


def test_cache_at_minus_one_hits_every_sample_after_the_first():
    model, task = tiny()
    images = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    cached = episodic(model, task, cache=-1.0)
    logits = torch.cat([cached.adapt(images[:3]), cached.adapt(images[3:])])
    assert cached.counters()["cache_hits"] == 4
    first = episodic(model, task)
    assert torch.allclose(logits[:1], first.adapt(images[:1]), atol=1e-12)
    weights = [w[:1].expand(4, *w.shape[1:]) for w in cached.cache.weights]
    assert torch.allclose(logits[1:], first.predict_with(weights, images[1:]), atol=1e-12)  # the first sample's weights


def test_cache_reuses_the_weights_of_the_most_similar_recent_sample():
    from tta_cli.engine.weight_cache import WeightCache

    cache = WeightCache(tau=0.9, size=2)
    keys = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1], [0.1, 0.99]]), dim=1)
    leaders, source = cache.plan(keys)
    assert leaders == [0, 1] and source == [0, 1, 0, 1]
    cache.store(keys[leaders], [torch.arange(2.0)])
    leaders, source = cache.plan(F.normalize(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), dim=1))
    assert leaders == [1] and source == [1, 2]  # cached entry 1; a new leader after the 2 cached


# ---- nearest-neighbour TTT ---------------------------------------------------------------------------------------


def test_retrieval_returns_the_exact_nearest_neighbours_of_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    index = EmbeddingIndex(torch.randn(500, 24, generator=generator).half(), torch.zeros(500, dtype=torch.long))
    queries = torch.randn(7, 24, generator=generator, dtype=torch.float64)
    found = index.nearest(queries, 5)
    for query, rows in zip(queries, found, strict=True):
        similarity = [F.cosine_similarity(query.float(), row.float(), dim=0).item() for row in index.embeddings]
        assert rows.tolist() == sorted(range(500), key=lambda row: -similarity[row])[:5]


@pytest.fixture
def neighbours_checkpoint(tmp_path, monkeypatch):
    """(model, task, folder): the tiny model saved as a checkpoint, with 40 random training images as its data."""
    from tta_cli.config import TrainConfig
    from tta_cli.train import checkpoint, embedding_index

    model, task = tiny(torch.float32)
    config = TrainConfig(model=ModelConfig(depth=8, groups=4))
    classes = [f"class{i}" for i in range(10)]
    checkpoint.save_model(tmp_path, model, config, classes, {})
    train_set = ImageSet(torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8), torch.arange(40) % 10, classes)
    monkeypatch.setattr("tta_cli.data.sources.load_split", lambda *args, **kwargs: train_set)
    embedding_index.write_index(tmp_path, model, train_set)
    return model, task, tmp_path


def test_ttt_nn_with_zero_steps_equals_source(neighbours_checkpoint):
    model, task, folder = neighbours_checkpoint
    images = torch.rand(3, 3, 32, 32)
    method = build_method("ttt-nn", model, task, settings(steps=0), 10, CPU, {"checkpoint": str(folder), "neighbours": 4})
    assert torch.allclose(method.adapt(images), model(images), atol=1e-5)


def test_ttt_nn_trains_each_sample_on_its_neighbours_and_resets(neighbours_checkpoint):
    model, task, folder = neighbours_checkpoint
    images = torch.rand(3, 3, 32, 32)
    own = {"checkpoint": str(folder), "neighbours": 4, "steps": 2, "lr": 0.1}
    method = build_method("ttt-nn", model, task, settings(), 10, CPU, own)
    together = method.adapt(images)
    assert not torch.allclose(together, model(images), atol=1e-4)
    alone = torch.cat([method.adapt(image[None]) for image in images])  # episodic: a sample's batch does not matter
    assert torch.allclose(together, alone, atol=1e-5)
    with_ssl = build_method("ttt-nn", model, task, settings(), 10, CPU, {**own, "ssl_weight": 0.5}).adapt(images)
    assert not torch.allclose(with_ssl, together, atol=1e-5)

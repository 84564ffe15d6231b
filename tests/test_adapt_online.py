"""Online TTT: weights carry over, resets happen exactly when asked, rollback catches harmful updates."""

import copy

import pytest
import torch

from tta_cli.adapt.methods.ttt_online import OnlineTTT
from tta_cli.adapt.online import OnlineConfig
from tta_cli.adapt.policies import PredictionWindow, ResetPolicy, RollbackPolicy, ShiftDetector
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.engine import compiled
from tta_cli.errors import TTAError
from tta_cli.models import build_model
from tta_cli.tasks import build_task


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    task = build_task(TaskConfig(name="rotation"))
    model = build_model(ModelConfig(depth=8, groups=4), task).to(dtype)
    return model, task


def encoder_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.encoder.parameters()])


def test_online_changes_weights_and_keeps_them():
    model, task = tiny()
    source = encoder_vector(model)
    method = OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=4, lr=0.01, amp=False), classes=10)
    method.adapt(torch.rand(1, 3, 32, 32))
    after_one = encoder_vector(method.model)
    method.adapt(torch.rand(1, 3, 32, 32))
    after_two = encoder_vector(method.model)
    assert not torch.equal(after_one, source)
    assert not torch.equal(after_two, after_one)
    assert torch.equal(encoder_vector(model), source)  # the caller's model is untouched (it was copied)
    method.reset()
    assert torch.equal(encoder_vector(method.model), source)


def test_online_single_step_equals_plain_sgd_step():
    model, task = tiny(torch.float64)
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    method = OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=4, lr=0.1, amp=False), classes=10, generator=torch.Generator().manual_seed(5))
    logits = method.adapt(images)
    from tta_cli.engine.episodic import EpisodicConfig, adapt_sequential

    config = EpisodicConfig(steps=1, lr=0.1, copies=4, amp=False)
    reference = adapt_sequential(copy.deepcopy(model), task, config, images, torch.Generator().manual_seed(5))
    assert torch.allclose(logits, reference, atol=1e-10)


def test_every_n_resets_exactly_every_n_samples():
    model, task = tiny()
    source = encoder_vector(model)
    config = OnlineConfig(copies=2, lr=0.01, amp=False, reset=ResetPolicy.parse("every:3"))
    method = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
    reset_at, original_reset = [], method.reset

    def recording_reset():
        original_reset()
        reset_at.append(method.samples_seen)
        assert torch.equal(encoder_vector(method.model), source)

    method.reset = recording_reset
    for _ in range(7):
        method.adapt(torch.rand(1, 3, 32, 32))
    assert reset_at == [3, 6]  # before the 4th and the 7th sample: after every 3 samples
    assert method.counters()["scheduled_resets"] == 2


def test_every_n_must_divide_by_batch():
    model, task = tiny()
    with pytest.raises(TTAError):
        OnlineTTT(model, task, OnlineConfig(batch=4, reset=ResetPolicy.parse("every:6")), classes=10)


def test_reset_policy_parsing():
    assert ResetPolicy.parse("never").kind == "never"
    assert ResetPolicy.parse("every:10").every == 10
    assert ResetPolicy.parse("on-shift").kind == "on-shift"
    for bad in ("sometimes", "every:0", "every:x"):
        with pytest.raises(TTAError):
            ResetPolicy.parse(bad)


def feed(detector: ShiftDetector, losses) -> list[bool]:
    return [bool(detector.update(torch.tensor(value))) for value in losses]


def test_shift_detector_fires_on_a_jump_and_not_on_a_steady_stream():
    generator = torch.Generator().manual_seed(0)
    steady = (0.5 + 0.05 * torch.randn(400, generator=generator)).tolist()
    assert not any(feed(ShiftDetector(ResetPolicy(kind="on-shift"), torch.device("cpu")), steady))
    switched = steady[:200] + (1.2 + 0.05 * torch.randn(100, generator=generator)).tolist()
    fired = feed(ShiftDetector(ResetPolicy(kind="on-shift"), torch.device("cpu")), switched)
    first = fired.index(True)
    assert 200 <= first < 200 + 8  # within the short window after the switch
    assert not any(fired[:200])


def oriented_images(count: int, generator) -> torch.Tensor:
    """Images whose rotation is easy to tell: bright top, dark bottom, plus mild noise."""
    ramp = torch.linspace(1.0, 0.0, 32).view(1, 1, 32, 1).expand(count, 3, 32, 32)
    return (ramp + 0.05 * torch.randn(count, 3, 32, 32, generator=generator)).clamp(0, 1)


def test_on_shift_fires_on_a_switch_of_corruption_not_on_a_steady_stream():
    """Teach the rotation head oriented images, then stream them clean and switch to heavy noise."""
    model, task = tiny()
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(25):
        inputs, targets = task.make_batch(oriented_images(16, generator), mode="train")
        optimizer.zero_grad()
        task.loss(model.ssl(inputs), targets).backward()
        optimizer.step()
    config = OnlineConfig(copies=8, lr=0.0, amp=False, reset=ResetPolicy(kind="on-shift", short=4, long=16))
    steady = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(0))
    for image in oriented_images(40, generator):
        steady.adapt(image[None])
    assert steady.counters()["shift_resets"] == 0
    switching = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(0))
    noisy = torch.rand(8, 3, 32, 32, generator=generator)
    for image in torch.cat([oriented_images(24, generator), noisy]):
        switching.adapt(image[None])
    assert switching.counters()["shift_resets"] >= 1


def test_rollback_catches_an_absurd_learning_rate():
    model, task = tiny()
    images = torch.rand(6, 3, 32, 32)
    config = OnlineConfig(copies=8, lr=1e4, amp=False, rollback=RollbackPolicy(enabled=True, margin=0.05, max_strikes=2))
    method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(0))
    for image in images:
        method.adapt(image[None])
    counters = method.counters()
    assert counters["rollbacks"] >= 1
    assert counters["rollbacks_to_source"] >= 1
    assert torch.isfinite(encoder_vector(method.model)).all()
    without = OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=8, lr=1e4, amp=False), classes=10, generator=torch.Generator().manual_seed(0))
    for image in images:
        without.adapt(image[None])
    assert (encoder_vector(without.model) - encoder_vector(model)).abs().max() > (encoder_vector(method.model) - encoder_vector(model)).abs().max()


def test_prediction_window_detects_collapse():
    window = PredictionWindow(8, 10, torch.device("cpu"))
    window.update(torch.arange(8) % 10)
    assert not bool(window.collapsed(0.5))
    window.update(torch.zeros(8, dtype=torch.long))
    assert bool(window.collapsed(0.5))


def test_the_ungated_update_equals_a_gate_that_always_passes():
    """_apply_gradient's two branches (no gate; a gate tensor) are one momentum update: a confidence gate of 1.0
    passes every step, so both give the same weights, counting updates alike."""
    model, task = tiny(torch.float64)
    images = torch.rand(4, 1, 3, 32, 32, dtype=torch.float64)
    runs = []
    for skip_above in (None, 1.0):
        config = OnlineConfig(copies=4, lr=0.05, momentum=0.9, amp=False, skip_above=skip_above)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(6))
        logits = torch.cat([method.adapt(image) for image in images])
        runs.append((logits, encoder_vector(method.model), method.counters()["updates"]))
    (logits, weights, updates), (gated_logits, gated_weights, gated_updates) = runs
    assert torch.equal(gated_weights, weights) and torch.equal(gated_logits, logits)
    assert not torch.equal(weights, encoder_vector(model)) and updates == gated_updates == 4


def test_compiled_online_step_equals_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # traces as inductor would, without generating code
    model, task = tiny()
    images = torch.rand(3, 1, 3, 32, 32)
    outputs = []
    for compile_step in (False, True):
        config = OnlineConfig(copies=4, lr=0.05, amp=False, compile=compile_step)
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(2))
        outputs.append((torch.cat([method.adapt(image) for image in images]), encoder_vector(method.model)))
    (eager_logits, eager_weights), (compiled_logits, compiled_weights) = outputs
    assert torch.allclose(compiled_logits, eager_logits, atol=1e-5)
    assert torch.allclose(compiled_weights, eager_weights, atol=1e-6)
    assert not torch.equal(compiled_weights, encoder_vector(model))


@pytest.mark.parametrize("batch,steps", [(1, 1), (2, 2)])
def test_pipelined_sequence_equals_one_adapt_call_per_batch(batch, steps):
    model, task = tiny(torch.float64)
    images = torch.rand(7, 3, 32, 32, dtype=torch.float64)  # 7: with batch 2 the last batch is short
    results = []
    for pipeline in (False, True):
        config = OnlineConfig(
            copies=4, lr=0.05, amp=False, momentum=0.9, steps=steps, batch=batch, skip_above=0.9,
            reset=ResetPolicy.parse("on-shift"), pipeline=pipeline,
        )
        method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(9))
        assert method.can_pipeline() == pipeline
        logits = method.adapt_sequence(images)
        results.append((logits, encoder_vector(method.model), method.counters(), method.samples_seen))
    (logits, weights, counters, seen), (piped_logits, piped_weights, piped_counters, piped_seen) = results
    assert logits.shape == (7, 10) and torch.allclose(piped_logits, logits, atol=1e-10)
    assert torch.allclose(piped_weights, weights, atol=1e-12)
    assert piped_counters == counters and piped_seen == seen == 7


def test_rollback_counts_a_nan_loss_after_an_update_as_worse():
    """NaN compares false to everything, so `after > before * (1 + margin)` alone would keep a diverged update."""
    model, task = tiny()
    method = OnlineTTT(copy.deepcopy(model), task, OnlineConfig(copies=4, amp=False, rollback=RollbackPolicy(enabled=True)), classes=10)
    snapshot = method.snapshot.clone()
    method.weights.flat.add_(1.0)  # the update under judgement
    method._ssl_loss = lambda inputs, targets: torch.tensor(float("nan"))
    method._check_update(None, None, torch.tensor(1.0), torch.ones(()))
    assert method.counters()["rollbacks"] == 1
    assert torch.equal(method.weights.flat, snapshot)


@pytest.mark.parametrize("steps", [1, 2])
def test_overlapped_prediction_is_the_prediction_before_the_update_in_float64(steps):
    """adapt_overlapped(x, earlier): the logits predict(earlier) gives before the update, then the update adapt(x)
    makes; the CPU twin of the side-stream path (tests/test_adapt_cuda.py runs it in a CUDA graph)."""
    model, task = tiny(torch.float64)
    images = torch.rand(4, 1, 3, 32, 32, dtype=torch.float64)
    config = OnlineConfig(copies=4, lr=0.05, amp=False, momentum=0.9, steps=steps)
    plain = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(3))
    overlapped = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=torch.Generator().manual_seed(3))
    assert overlapped.can_overlap()
    assert overlapped.adapt_overlapped(images[0], None) is None
    plain.adapt(images[0])
    for earlier, image in zip(images[:-1], images[1:], strict=True):
        expected = plain.predict(earlier)
        plain.adapt(image)
        assert torch.allclose(overlapped.adapt_overlapped(image, earlier), expected, atol=1e-12)
        assert torch.allclose(encoder_vector(overlapped.model), encoder_vector(plain.model), atol=1e-12)
    assert overlapped.counters() == plain.counters() and overlapped.samples_seen == plain.samples_seen == 4


@pytest.mark.parametrize(
    "config",
    [
        {"rollback": RollbackPolicy(enabled=True)}, {"reset": ResetPolicy.parse("on-shift")}, {"steps": 0},
        {"reset": ResetPolicy.parse("every:4")}, {"pre_update": True},
    ],
    ids=str,
)
def test_overlap_is_refused_where_something_acts_between_prediction_and_update(config):
    model, task = tiny()
    method = OnlineTTT(model, task, OnlineConfig(copies=2, amp=False, **config), classes=10)
    assert not method.can_overlap()
    with pytest.raises(ValueError, match="can_overlap"):
        method.adapt_overlapped(torch.rand(1, 3, 32, 32), None)

"""The zeroed outputs of the atomic launches, zeroed together at a call's start (models/zeroed_outputs.py)."""

import pytest
import torch

from tta_cli.models import zeroed_outputs

CPU = torch.device("cpu")
REQUESTS = (("dw", (1, 4, 9)), ("dw", (1, 4, 9)), ("dw", (1, 3)), ("dx", (1, 2, 5, 5)))


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    monkeypatch.setattr(zeroed_outputs, "_PLANS", {})


@pytest.fixture
def fresh_zeros(monkeypatch):
    """Counts the outputs made by torch.zeros (the fallback) rather than handed out ready."""
    made = []
    real = torch.zeros

    def counting(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", counting)
    return made


def take(name="step", requests=REQUESTS):
    with zeroed_outputs.one_fill(name):
        return [zeroed_outputs.zeros(role, shape, CPU, torch.float32) for role, shape in requests]


def test_outside_a_call_each_output_is_made_by_torch_zeros(fresh_zeros):
    output = zeroed_outputs.zeros("dw", (1, 8), CPU, torch.float32)
    assert len(fresh_zeros) == 1 and output.shape == (1, 8) and int(output.abs().sum()) == 0


def test_a_later_call_hands_out_outputs_zeroed_at_its_start(fresh_zeros):
    take()  # the first call learns what it needs
    assert len(fresh_zeros) == len(REQUESTS)
    for _ in range(3):
        outputs = take()
        assert all(int(t.abs().sum()) == 0 for t in outputs) and [tuple(t.shape) for t in outputs] == [s for _, s in REQUESTS]
        for t in outputs:
            t.add_(7.0)  # what an atomic launch leaves behind
    assert len(fresh_zeros) == len(REQUESTS)  # none made since the first call


def test_outputs_of_one_call_share_no_storage():
    take()
    storages = {t.untyped_storage().data_ptr() for t in take()}
    assert len(storages) == len(REQUESTS)


def test_a_call_that_needs_more_gets_fresh_zeros_for_the_rest_and_has_them_ready_next_time(fresh_zeros):
    take()
    more = (*REQUESTS, ("dw", (1, 3)), ("out", (2, 2)))
    take(requests=more)
    assert len(fresh_zeros) == len(REQUESTS) + 2
    take(requests=more)
    take()  # fewer than planned: the rest stay unused
    assert len(fresh_zeros) == len(REQUESTS) + 2


def test_calls_of_other_names_plan_apart_and_nested_calls_use_the_outer_one(fresh_zeros):
    take("step")
    take("predict", requests=(("out", (3,)),))
    with zeroed_outputs.one_fill("step"), zeroed_outputs.one_fill("inner"):
        for role, shape in REQUESTS:
            zeroed_outputs.zeros(role, shape, CPU, torch.float32)
    assert len(fresh_zeros) == len(REQUESTS) + 1 and "inner" not in zeroed_outputs._PLANS


def test_suspended_makes_fresh_zeros_and_takes_nothing_ready(fresh_zeros):
    take()
    with zeroed_outputs.one_fill("step"):
        with zeroed_outputs.suspended():
            zeroed_outputs.zeros("dw", (1, 3), CPU, torch.float32)
        for role, shape in REQUESTS:
            zeroed_outputs.zeros(role, shape, CPU, torch.float32)
    assert len(fresh_zeros) == len(REQUESTS) + 1

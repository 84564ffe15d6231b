"""The zeroed outputs of the atomic launches, zeroed together at a call's start (kernels/zeroed_outputs.py)."""

import pytest
import torch

from tta_cli.kernels import zeroed_outputs

CPU = torch.device("cpu")
REQUESTS = (("dw", (1, 4, 9)), ("dw", (1, 4, 9)), ("dw", (1, 3)), ("dx", (1, 2, 5, 5)))


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


@pytest.fixture
def plan():
    return zeroed_outputs.new_plan()


def take(plan, requests=REQUESTS):
    with zeroed_outputs.one_fill(plan):
        return [zeroed_outputs.zeros(role, shape, CPU, torch.float32) for role, shape in requests]


def test_outside_a_call_each_output_is_made_by_torch_zeros(fresh_zeros):
    output = zeroed_outputs.zeros("dw", (1, 8), CPU, torch.float32)
    assert len(fresh_zeros) == 1 and output.shape == (1, 8) and int(output.abs().sum()) == 0


def test_a_later_call_hands_out_outputs_zeroed_at_its_start(plan, fresh_zeros):
    take(plan)  # the first call learns what it needs
    assert len(fresh_zeros) == len(REQUESTS)
    for _ in range(3):
        outputs = take(plan)
        assert all(int(t.abs().sum()) == 0 for t in outputs) and [tuple(t.shape) for t in outputs] == [s for _, s in REQUESTS]
        for t in outputs:
            t.add_(7.0)  # what an atomic launch leaves behind
    assert len(fresh_zeros) == len(REQUESTS)  # none made since the first call


def test_outputs_of_one_call_share_no_storage(plan):
    take(plan)
    storages = {t.untyped_storage().data_ptr() for t in take(plan)}
    assert len(storages) == len(REQUESTS)


def test_a_call_that_needs_more_gets_fresh_zeros_for_the_rest_and_has_them_ready_next_time(plan, fresh_zeros):
    take(plan)
    more = (*REQUESTS, ("dw", (1, 3)), ("out", (2, 2)))
    take(plan, more)
    assert len(fresh_zeros) == len(REQUESTS) + 2
    take(plan, more)
    take(plan)  # fewer than planned: the rest stay unused
    assert len(fresh_zeros) == len(REQUESTS) + 2


def test_calls_of_other_plans_plan_apart_and_nested_calls_use_the_outer_one(plan, fresh_zeros):
    other, inner = zeroed_outputs.new_plan(), zeroed_outputs.new_plan()
    take(plan)
    take(other, (("out", (3,)),))
    with zeroed_outputs.one_fill(plan), zeroed_outputs.one_fill(inner):
        for role, shape in REQUESTS:
            zeroed_outputs.zeros(role, shape, CPU, torch.float32)
    assert len(fresh_zeros) == len(REQUESTS) + 1 and not inner and sum(other.values()) == 1


def test_suspended_makes_fresh_zeros_and_takes_nothing_ready(plan, fresh_zeros):
    take(plan)
    with zeroed_outputs.one_fill(plan):
        with zeroed_outputs.suspended():
            zeroed_outputs.zeros("dw", (1, 3), CPU, torch.float32)
        for role, shape in REQUESTS:
            zeroed_outputs.zeros(role, shape, CPU, torch.float32)
    assert len(fresh_zeros) == len(REQUESTS) + 1

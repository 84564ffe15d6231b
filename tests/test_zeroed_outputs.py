"""The shared zeroed outputs of the atomic convolution launches (models/zeroed_outputs.py), on the CPU."""

import pytest
import torch

from tta_cli.models import zeroed_outputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(zeroed_outputs, "_NEEDED", {})
    monkeypatch.setattr(zeroed_outputs, "_BUFFERS", {})
    monkeypatch.setattr(zeroed_outputs, "_KEPT", [])


def take_three(name="step"):
    with zeroed_outputs.one_fill(name):
        return [zeroed_outputs.zeros(role, shape, CPU, torch.float32) for role, shape in (("dw", (1, 4, 9)), ("dw", (1, 3)), ("dx", (1, 2, 5, 5)))]


def test_outside_a_call_each_output_is_its_own_zeroed_tensor():
    first, second = (zeroed_outputs.zeros("dw", (1, 8), CPU, torch.float32) for _ in range(2))
    assert first.abs().sum() == 0 and first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_a_later_call_takes_slices_of_one_buffer_per_role():
    take_three()  # the first call learns the sizes
    dw_a, dw_b, dx = take_three()
    assert dw_a.untyped_storage().data_ptr() == dw_b.untyped_storage().data_ptr() != dx.untyped_storage().data_ptr()
    assert dw_b.data_ptr() - dw_a.data_ptr() == zeroed_outputs.ALIGN * 4  # 36 elements, rounded up to one aligned block
    assert [tuple(t.shape) for t in (dw_a, dw_b, dx)] == [(1, 4, 9), (1, 3), (1, 2, 5, 5)]


def test_each_call_zeroes_what_the_last_one_wrote():
    take_three()
    for _ in range(3):
        outputs = take_three()
        assert all(int(t.abs().sum()) == 0 for t in outputs)
        for t in outputs:
            t.add_(7.0)  # what an atomic launch leaves behind


def test_a_call_that_needs_more_than_the_last_gets_fresh_zeros_for_the_rest_and_room_next_time():
    take_three()
    with zeroed_outputs.one_fill("step"):
        kept = [zeroed_outputs.zeros("dw", (1, 4, 9), CPU, torch.float32), zeroed_outputs.zeros("dw", (1, 3), CPU, torch.float32)]
        extra = zeroed_outputs.zeros("dw", (1, 100), CPU, torch.float32)
    assert extra.untyped_storage().data_ptr() != kept[0].untyped_storage().data_ptr() and int(extra.abs().sum()) == 0
    with zeroed_outputs.one_fill("step"):
        *_, again = [zeroed_outputs.zeros("dw", shape, CPU, torch.float32) for shape in ((1, 4, 9), (1, 3), (1, 100))]
    assert again.untyped_storage().data_ptr() == zeroed_outputs._BUFFERS[("step", "dw", 0, "cpu", torch.float32)].untyped_storage().data_ptr()


def test_calls_of_other_names_have_their_own_buffers_and_nested_calls_share_the_outer_one():
    take_three("step")
    take_three("predict")
    step, predict = take_three("step")[0], take_three("predict")[0]
    assert step.untyped_storage().data_ptr() != predict.untyped_storage().data_ptr()
    with zeroed_outputs.one_fill("step"), zeroed_outputs.one_fill("inner"):
        inner = zeroed_outputs.zeros("dw", (1, 4, 9), CPU, torch.float32)
    assert inner.data_ptr() == step.data_ptr() and not any(key[0] == "inner" for key in zeroed_outputs._NEEDED)


def test_suspended_hands_out_fresh_zeros_inside_a_call():
    take_three()
    with zeroed_outputs.one_fill("step"):
        with zeroed_outputs.suspended():
            timed = zeroed_outputs.zeros("dw", (1, 4, 9), CPU, torch.float32)
        served = zeroed_outputs.zeros("dw", (1, 4, 9), CPU, torch.float32)
    buffer = zeroed_outputs._BUFFERS[("step", "dw", 0, "cpu", torch.float32)]
    assert timed.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr() == served.untyped_storage().data_ptr()
    assert served.data_ptr() == buffer.data_ptr()  # the timed launch took no slice

"""Zeroed outputs for the atomic launches (convolutions, norms), zeroed together at a call's start: one kernel per
call of a step instead of one fill per launch.

Why: an atomic launch (triton_conv.Launch(atomic=True)) adds its split sums into a zeroed fp32 output, and that
zeroing would be its own fill kernel, dozens a frame of the stream step (docs/speed-notes.md). Inside
`one_fill(plan)` the outputs that the earlier calls with that plan asked for are allocated when the call starts and
zeroed by one `torch._foreach_zero_`, and each request takes the next one of its role, shape and dtype. A request
beyond them (the first call, new shapes) gets torch.zeros, as outside any `one_fill`, and the next call has it
ready.

What a caller promises: the outputs are used on the call's stream, or on streams that wait for it after the call
starts (the zeroing runs on the stream current at the start). OnlineTTT's calls hold that: the overlapped
prediction's side stream waits for the main stream first. A CUDA graph captured inside `one_fill` holds the
zeroing as one node and the outputs in its own memory pool.

Each output is its own tensor, not a slice of one buffer: a custom op's output may not share storage with its
inputs, and one layer's input gradient is the next one's input.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class _Call:
    ready: dict[tuple, list[torch.Tensor]]  # (role, shape, device, dtype) -> zeroed outputs not yet handed out
    asked: Counter = field(default_factory=Counter)  # what this call asked for, handed out or not


# The call in progress: a plain global, not a context variable, since autograd runs a CUDA backward pass on its
# own worker thread, which sees no context variable of the thread that asked for the gradients.
_active: _Call | None = None


def new_plan() -> Counter:
    """What one kind of call needs: the most outputs of each (role, shape, device, dtype) one call asked for. Each
    caller keeps its own (OnlineTTT one per kind of call), so that two models in one process plan apart."""
    return Counter()


@contextlib.contextmanager
def one_fill(plan: Counter):
    """Atomic outputs taken inside come ready zeroed, all zeroed at once here, as many as `plan` (new_plan) says
    the earlier calls with it asked for; this call's requests are added to it (see the module's doc)."""
    global _active
    if _active is not None:  # nested: the outer call's outputs serve
        yield
        return
    ready = {key: [torch.empty(key[1], device=key[2], dtype=key[3]) for _ in range(count)] for key, count in plan.items()}
    alike: dict[tuple, list[torch.Tensor]] = {}  # one multi-tensor kernel per device and dtype
    for (_, _, device, dtype), tensors in ready.items():
        alike.setdefault((device, dtype), []).extend(tensors)
    for tensors in alike.values():
        torch._foreach_zero_(tensors)
    call = _active = _Call(ready)
    try:
        yield
    finally:
        _active = None
        plan |= call.asked  # the larger count of each


@contextlib.contextmanager
def suspended():
    """Fresh torch.zeros inside, as outside any call: for the convolutions' timing at a new shape, whose repeated
    launches would each take an output."""
    global _active
    call, _active = _active, None
    try:
        yield
    finally:
        _active = call


def zeros(role: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor of `shape`: the call's next ready one for (`role`, shape, dtype) when a call is active and
    has one left, else torch.zeros. `role` says whose output it is ("out", "dx", "dw": a forward pass, an input or
    a weight gradient), so that a plan says what it holds."""
    call = _active
    if call is None or math.prod(shape) == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    key = (role, tuple(shape), torch.device(device), dtype)
    call.asked[key] += 1
    ready = call.ready.get(key)
    return ready.pop(0) if ready else torch.zeros(shape, device=device, dtype=dtype)

"""Zeroed outputs for the atomic convolution launches, one fill per call of a step instead of one per launch.

Why: an atomic launch (triton_conv.Launch(atomic=True)) adds its split sums into a zeroed fp32 output, and that
zeroing was its own fill kernel: 65 fills a frame of the stream step, 60 us of its 1,159 us of kernels on an H200
(docs/speed-notes.md). Inside `one_fill(name)` each such output is instead a slice of a buffer that was zeroed once,
at the call's first atomic launch on that stream, for everything the earlier calls of `name` took there. The
buffer's size is learnt from those calls: a call that needs more than was zeroed (the first, or new shapes) gets
torch.zeros for the rest, as outside any `one_fill`.

What a caller promises: every output taken inside a `one_fill` is dead when the next call of the same name starts
(the next call zeroes the buffer again), and no two calls of one name run at once. OnlineTTT's step, prediction
and update do all their forward and backward passes inside one call, so that holds there. A CUDA graph captured
inside `one_fill` holds the fill as one node and the slices at fixed addresses: buffers are never freed.

Slices are keyed by `role` too ("out", "dx", "dw"), so the two outputs of one launch of both gradients are
different buffers (a custom op's outputs may not share storage).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

ALIGN = 64  # elements: each slice starts on a 256-byte boundary (Triton specialises kernels on aligned pointers)


@dataclass
class _Slot:
    """One stream's buffer for one role within a call: zeroed up to `zeroed`; `wanted`, what the call asked for so
    far (handed out or not: what the next call zeroes)."""

    buffer: torch.Tensor
    zeroed: int
    wanted: int = 0


@dataclass
class _Call:
    name: str
    slots: dict[tuple, _Slot] = field(default_factory=dict)  # (role, stream order, device, dtype) -> slot
    streams: list = field(default_factory=list)  # the streams in the order of their first request


# The call in progress: a plain global, not a context variable, since autograd runs a CUDA backward pass on its
# own worker thread, which sees no context variable of the thread that asked for the gradients.
_active: _Call | None = None
_NEEDED: dict[tuple, int] = {}  # (name, role, stream order, device, dtype) -> elements the largest call took
_BUFFERS: dict[tuple, torch.Tensor] = {}  # same key -> the buffer (the largest made so far)
_KEPT: list[torch.Tensor] = []  # buffers outgrown: a graph captured earlier may still write into them


@contextlib.contextmanager
def one_fill(name: str):
    """Atomic outputs taken inside come from buffers zeroed once per stream and role (see the module's doc)."""
    global _active
    if _active is not None:  # nested: the outer call's fill serves
        yield
        return
    call = _active = _Call(name)
    try:
        yield
    finally:
        _active = None
        for key, slot in call.slots.items():
            _NEEDED[(name, *key)] = max(_NEEDED.get((name, *key), 0), slot.wanted)


@contextlib.contextmanager
def suspended():
    """No shared buffers inside (torch.zeros as outside any call): for the convolutions' timing at a new shape,
    whose repeated launches would each take a slice."""
    global _active
    call, _active = _active, None
    try:
        yield
    finally:
        _active = call


def zeros(role: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor of `shape`: a slice of this call's buffer for (`role`, the current stream) when one is
    active and has room, else torch.zeros."""
    call = _active
    numel = math.prod(shape)
    if call is None or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    slot = _slot(call, role, device, dtype)
    start = slot.wanted
    slot.wanted = start + _aligned(numel)
    if start + numel > slot.zeroed:  # more than the earlier calls took: learnt for the next call
        return torch.zeros(shape, device=device, dtype=dtype)
    return slot.buffer[start : start + numel].view(shape)


def _slot(call: _Call, role: str, device: torch.device, dtype: torch.dtype) -> _Slot:
    """This call's slot for `role` on the current stream, zeroing its buffer (as far as earlier calls needed) at
    the first request: on that stream, so before every launch that takes a slice of it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    if stream not in call.streams:
        call.streams.append(stream)
    key = (role, call.streams.index(stream), str(device), dtype)
    if key not in call.slots:
        needed = _NEEDED.get((call.name, *key), 0)
        buffer = _BUFFERS.get((call.name, *key))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if needed and (buffer is None or buffer.numel() < needed) and not capturing:
            if buffer is not None:
                _KEPT.append(buffer)
            buffer = _BUFFERS[(call.name, *key)] = torch.empty(needed, device=device, dtype=dtype)
        if buffer is None:
            buffer = torch.empty(0, device=device, dtype=dtype)
        zeroed = min(needed, buffer.numel())
        if zeroed:
            buffer[:zeroed].zero_()
        call.slots[key] = _Slot(buffer, zeroed)
    return call.slots[key]


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN

"""A stateful call captured once as a CUDA graph and replayed: what both online paths do with their step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class CapturedCall:
    """`run(*inputs)` as a CUDA graph. Capturing warms up three times on a side stream (compiling, choosing
    kernels), puts `state` (the tensors the call changes in place: weights, velocity, counters) back as it was,
    then captures one call on static copies of the inputs. Calling copies new inputs in and replays; the output
    is the graph's own tensor, overwritten by the next replay."""

    def __init__(self, run: Callable, inputs: Sequence[torch.Tensor], state: Sequence[torch.Tensor]):
        saved = [tensor.clone() for tensor in state]
        self.static_inputs = [tensor.clone() for tensor in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = run(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, given in zip(self.static_inputs, inputs, strict=True):
            static.copy_(given)
        self.graph.replay()
        return self.static_output

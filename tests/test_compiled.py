"""torch.compile with a way back: a failed compile runs the function eagerly; the function's own errors pass."""

import pytest
import torch

from tta_cli.engine.compiled import CompiledOrEager


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C compiler here")


def test_a_failed_compile_warns_once_and_runs_eagerly():
    double = CompiledOrEager(lambda x: x * 2, backend=failing_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert double.failed is not None
    assert torch.equal(double(torch.arange(3.0)), torch.arange(3.0) * 2)  # eager from now on, no second warning


def test_errors_of_the_computation_itself_are_not_swallowed():
    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        CompiledOrEager(out_of_memory, backend="eager")(torch.ones(2))

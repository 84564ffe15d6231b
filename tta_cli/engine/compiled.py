"""torch.compile for the adaptation hot paths, with a way back: if compiling fails on the first call (an
unsupported op, a missing C compiler), warn once and run the same function eagerly from then on."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def allow_recompiles(limit: int = 64) -> None:
    """Every method instance (one per `--method`, per `--compare` run) compiles the same code for its own
    shapes and grad modes; dynamo's default of 8 cache entries per function would silently fall back."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


class CompiledOrEager:
    """Calls `torch.compile(function)`; the first compile error (dynamo or inductor, including a missing C
    compiler, which inductor reports as one) switches to `function`. Errors of the computation itself, such as
    running out of memory, are raised as they are."""

    def __init__(self, function: Callable, backend: str = "inductor", dynamic: bool | None = False):
        allow_recompiles()
        self.eager = function
        self.compiled = torch.compile(function, backend=backend, dynamic=dynamic)
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:  # tracing or code generation; a real error (OOM) passes
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # inside a CUDA graph capture nothing can be retried: let the caller see it
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"torch.compile failed ({self.failed}); running eagerly instead", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)


BACKEND = "inductor"  # tests on the CPU set "aot_eager" (traces without generating code)


def maybe_compile(function: Callable, enabled: bool) -> Callable:
    """`function` compiled with BACKEND (with the eager fallback) when `enabled`, else unchanged."""
    return CompiledOrEager(function, BACKEND) if enabled else function


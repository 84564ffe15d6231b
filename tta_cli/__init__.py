"""tta: test-time training for vision classifiers.

The Python API (tta_cli/api.py): `load_checkpoint`, `from_classifier` (TTT attached to your classifier),
`build_method` -> an `Adapter` with `adapt`, `predict`, `reset`, `state_dict` and `save`. Imported on first use,
so the CLI starts without it.
"""

__version__ = "0.1.0"
__all__ = ["Adapter", "Checkpoint", "build_method", "from_classifier", "load_checkpoint"]


def __getattr__(name: str):
    if name in __all__:
        from tta_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'tta_cli' has no attribute {name!r}")

"""tta: test-time training for vision classifiers."""

__version__ = "0.1.0"

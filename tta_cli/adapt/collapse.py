"""Divergence that NaN checks miss: an absurd learning rate can leave finite logits that all pick one class.

A run has collapsed when an adapting method predicts one class for more than COLLAPSED_SHARE of the samples while
neither the labels nor the unadapted checkpoint concentrate like that (each below SPREAD_SHARE on its top class):
the table would then report the error of a constant guess as a result."""

from __future__ import annotations

import torch

from tta_cli.errors import TTAError

COLLAPSED_SHARE = 0.9
SPREAD_SHARE = 0.6
MIN_SAMPLES = 20  # fewer samples say nothing about concentration


def top_share(values: torch.Tensor) -> float:
    """The share of the most frequent value among the non-negative entries of `values` (N,)."""
    values = values[values >= 0]
    return float(torch.bincount(values).max()) / len(values) if len(values) else 0.0


@torch.no_grad()
def unadapted_predictions(model, images: list[torch.Tensor], device: torch.device, batch: int = 500) -> torch.Tensor:
    """The checkpoint's own predictions on uint8 image batches (N, H, W, 3), concatenated."""
    from tta_cli.data.imageset import to_float_nchw

    model.eval()
    out = [model(to_float_nchw(chunk.to(device))).argmax(1).cpu() for block in images for chunk in block.split(batch)]
    return torch.cat(out)


def check_collapse(results, sets, model, device: torch.device) -> None:
    """`tta adapt`: refuse results whose adaptation collapsed; the unadapted predictions are those of `source` when
    it ran, else computed from `model` only when a method looks collapsed."""
    labels = torch.cat([image_set.labels for image_set in sets])
    source = next((result.predictions.cpu() for result in results if result.method == "source"), None)
    check_predictions(results, labels, source if source is not None else lambda: unadapted_predictions(model, [s.images for s in sets], device))


def check_predictions(results, labels: torch.Tensor, source_predictions) -> None:
    """Raise for the first adapting method whose predictions collapsed onto one class (see the module doc).
    `source_predictions` is a tensor, or a callable that computes it (only run when a method looks collapsed)."""
    if len(labels) < MIN_SAMPLES or top_share(labels) >= SPREAD_SHARE:
        return
    for result in results:
        if result.method == "source":
            continue
        share = top_share(result.predictions.cpu())
        if share <= COLLAPSED_SHARE:
            continue
        if callable(source_predictions):
            source_predictions = source_predictions()
        if top_share(source_predictions) < SPREAD_SHARE:
            raise TTAError(
                f"{result.method}: the adaptation collapsed: {100 * share:.0f}% of its predictions are one class, while the "
                f"checkpoint without adaptation spreads over the classes; lower --lr (or --set tent.lr for tent) or add --rollback "
                "for ttt-online; nothing was written"
            )

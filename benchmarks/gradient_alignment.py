"""Does a step on the self-supervised loss help the classifier? Prints, per corruption, the cosine between the
encoder's gradient of one test image's ssl loss (over its test-time views, drawn as `ttt` draws them) and of its
main loss with the true label, averaged over images, and the share of images where it is positive.

Sun et al. (2020, Theorem 1 and Figure 4) tie TTT's gain to this correlation: one SGD step of rate lr on the ssl
loss changes the main loss by -lr * <g_main, g_ssl> to first order, so a set whose mean cosine is near zero or
negative gains nothing from TTT however the rate is tuned.

    python benchmarks/gradient_alignment.py SETS CKPT [CKPT ...] [--n 64] [--severity 5] [--copies 32]

SETS is any shifted-set folder `tta adapt --data` reads (a `tta corrupt` output, say); CKPT a `tta train` folder or a packaged name.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from tta_cli import load_checkpoint
from tta_cli.data.imageset import to_float_nchw
from tta_cli.data.shifted import load_shifted
from tta_cli.tasks.views import make_views


def flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def gradients(model, task, image: torch.Tensor, label: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor]):
    """The encoder's gradients (flat) of the ssl loss on `views` (inputs, targets) and of the main loss on `image`."""
    params = list(model.encoder.parameters())
    g_ssl = flat_grad(task.loss(model.ssl(views[0]), views[1]), params)
    g_main = flat_grad(nn.functional.cross_entropy(model(image[None]), label[None]), params)
    return g_ssl, g_main


def cosines(checkpoint, images: torch.Tensor, labels: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """One cosine per image between the encoder gradients of its ssl loss and its main loss."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for image, label in zip(images, labels, strict=True):
        views = make_views(checkpoint.task, image[None], copies, generator)
        values.append(nn.functional.cosine_similarity(*gradients(checkpoint.model, checkpoint.task, image, label, views), dim=0))
    return torch.stack(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", type=Path)
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--n", type=int, default=64, help="images per corruption (the first n of the severity)")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--copies", type=int, default=32, help="test-time views per image, as tta adapt --copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()

    sets = load_shifted(args.sets, severities=[args.severity], n=args.n)  # read once, for every checkpoint
    table: dict[str, dict[str, list[float]]] = {}
    for ckpt in args.ckpts:
        checkpoint = load_checkpoint(ckpt)
        for shifted in sets:
            name = shifted.meta["corruption"]
            values = cosines(checkpoint, to_float_nchw(shifted.images), shifted.labels, args.copies, args.seed)
            mean, error, positive = values.mean().item(), values.std().item() / math.sqrt(len(values)), (values > 0).float().mean().item()
            table.setdefault(ckpt, {})[name] = [mean, error, positive]
            print(f"{Path(ckpt).name:<40} {name:<18} cos {mean:+.3f} +- {error:.3f}  positive {positive:.0%}", flush=True)

    print(f"\nmean cosine of the encoder gradients, ssl loss vs main loss, severity {args.severity}, first {args.n} images "
          f"(+- standard error; share positive)")
    print(f"{'corruption':<18} " + " ".join(f"{Path(c).name[:30]:>30}" for c in args.ckpts))
    for name in table[args.ckpts[0]]:
        cells = [f"{table[c][name][0]:+.3f} +- {table[c][name][1]:.3f} ({table[c][name][2]:.0%})" for c in args.ckpts]
        print(f"{name:<18} " + " ".join(f"{cell:>30}" for cell in cells))
    if args.json:
        args.json.write_text(json.dumps({"severity": args.severity, "n": args.n, "copies": args.copies, "table": table}, indent=1))


if __name__ == "__main__":
    main()

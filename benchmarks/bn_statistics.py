"""Do a BatchNorm checkpoint's test batches look like its training batches? Prints, per BatchNorm layer of the
encoder and main head, the test-batch variance over the running variance on clean test images, the same for
crop-padded copies of them (the training augmentation), and the clean error with running vs test-batch statistics.

    python benchmarks/bn_statistics.py CKPT [--data cifar10-mini] [--n 1000] [--batch 200] [--pad-mode zeros]

A ratio well under 1 on clean images and near 1 on crop-padded ones means the training crop, not the test data,
set the running statistics (docs/results.md, "BatchNorm models").
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tta_cli.data.augment import crop_flip, sample_crop_flip
from tta_cli.data.imageset import mix_classes, to_float_nchw
from tta_cli.data.sources import load_split
from tta_cli.train.checkpoint import load_model


def batch_variances(model: nn.Module, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Mean over batches of each BatchNorm input's per-channel variance, keyed by layer name."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not name.startswith("ssl_head")}
    sums = {name: 0.0 for name in norms}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: sums.__setitem__(name, sums[name] + i[0].var((0, 2, 3), unbiased=False)))
             for name, m in norms.items()]
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(images[start : start + batch])
    for hook in hooks:
        hook.remove()
    batches = -(-len(images) // batch)
    return {name: sums[name] / batches / norms[name].running_var for name in norms}


def error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, batch_statistics: bool) -> float:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train(batch_statistics)
            module.track_running_stats = not batch_statistics
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            wrong += int((model(images[start : start + batch]).argmax(1) != labels[start : start + batch]).sum())
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = True
    return 100.0 * wrong / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--data", default="cifar10-mini")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--pad-mode", default="zeros", help="padding of the crop-padded copies (zeros or reflect)")
    args = parser.parse_args()
    model, _, _ = load_model(args.ckpt)
    model.eval()
    test, _ = mix_classes(load_split(args.data, "test", limit=args.n), 0)
    images, labels = to_float_nchw(test.images), test.labels
    generator = torch.Generator().manual_seed(0)
    padded = crop_flip(images, *sample_crop_flip(len(images), 4, generator), padding=4, pad_mode=args.pad_mode)
    clean_ratio = batch_variances(model, images, args.batch)
    padded_ratio = batch_variances(model, padded, args.batch)
    print(f"{'BatchNorm layer':<36}{'clean var ratio':>16}{'padded var ratio':>18}")
    for name in clean_ratio:
        print(f"{name:<36}{float(clean_ratio[name].mean()):>16.3f}{float(padded_ratio[name].mean()):>18.3f}")
    running = error(model, images, labels, args.batch, batch_statistics=False)
    batch = error(model, images, labels, args.batch, batch_statistics=True)
    print(f"clean error on {len(images)} images: running statistics {running:.1f}, test-batch statistics {batch:.1f} (batches of {args.batch})")


if __name__ == "__main__":
    main()

"""Training images/s for a recipe's model (clean images per second; the rotation task adds 4x views).

    python benchmarks/train_speed.py recipes/sun2020-rotation-gn.yaml --batch-sizes 128,512 --steps 50 [--modes eager,default,reduce-overhead]
"""

from __future__ import annotations

import argparse
import time

import torch

from tta_cli.config import TrainConfig, load_config
from tta_cli.data.augment import random_crop_flip
from tta_cli.models import build_model
from tta_cli.tasks import build_task
from tta_cli.train.loop import JointLoss


def measure(config: TrainConfig, batch: int, steps: int, mode: str, device) -> float:
    """Clean images/s of the joint step; mode "eager" or a torch.compile mode ("default", "reduce-overhead")."""
    task = build_task(config.task)
    model = build_model(config.model, task).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=device.type == "cuda")
    loss_fn = JointLoss(model, task, 1.0, 0.0)
    step_fn = loss_fn if mode == "eager" else torch.compile(loss_fn, mode=mode)
    data = torch.rand(batch * 8, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch * 8,), device=device)

    def one(i):
        images = random_crop_flip(data[(i % 8) * batch : (i % 8 + 1) * batch])
        inputs, targets = task.make_batch(images)
        images = images.contiguous(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, *_ = step_fn(images, labels[:batch], inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(10):
        one(i)
    torch.cuda.synchronize() if device.type == "cuda" else None
    started = time.perf_counter()
    for i in range(steps):
        one(i)
    torch.cuda.synchronize() if device.type == "cuda" else None
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="eager,default,reduce-overhead", help="eager and/or torch.compile modes")
    args = parser.parse_args()
    config = load_config(TrainConfig, args.recipe, {})
    device = torch.device(args.device)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for mode in args.modes.split(","):
            rows.append((batch, mode, measure(config, batch, args.steps, mode, device)))
            print(rows[-1], flush=True)
    print(f"\ntrain speed: {args.recipe} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"{'batch':>6} {'mode':>16} {'clean images/s':>15}")
    for batch, mode, rate in rows:
        print(f"{batch:>6} {mode:>16} {rate:>15,.0f}")


if __name__ == "__main__":
    main()

"""Adaptation speed on the reference network (ResNet-26 GN, split after layer2, rotation), in one run:

- reference-episodic / reference-online: a faithful copy of the paper's loop (one sample at a time,
  32 copies augmented with PIL/torchvision transforms on the CPU, rotation on the GPU, torch.optim.SGD,
  weights restored with load_state_dict after each sample in the episodic case);
- tta's paths: batched episodic TTT (vmap over per-sample weights; fp32 and bf16) and online TTT
  (eager and CUDA graph).

Prints samples/s and peak GPU memory per path.  Usage:
    python benchmarks/adapt_speed.py [--ckpt DIR] [--episodic-samples 4096] [--online-samples 4000]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tta_cli.adapt.episodic import EpisodicConfig, EpisodicTTT
from tta_cli.adapt.online import OnlineConfig, OnlineTTT
from tta_cli.config import ModelConfig, TaskConfig
from tta_cli.models import build_model
from tta_cli.tasks import build_task


def reference_model(ckpt: str | None, device):
    if ckpt:
        from tta_cli.train.checkpoint import load_model

        model, config, _ = load_model(ckpt, device)
        return model, build_task(config.task)
    task = build_task(TaskConfig(name="rotation"))
    return build_model(ModelConfig(), task).to(device), task


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(model, task, images_uint8, steps, copies, lr, episodic, device) -> float:
    """The paper's per-sample loop with CPU PIL augmentation; returns samples/s."""
    import torchvision.transforms as T
    from PIL import Image

    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.encoder.named_parameters()]
    state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("encoder.")], lr=lr)
    assert names
    sync(device)
    started = time.perf_counter()
    for image in images_uint8:
        if episodic:
            model.load_state_dict(state)
        pil = Image.fromarray(image.numpy())
        for _ in range(steps):
            batch = torch.stack([augment(pil) for _ in range(copies)]).to(device)
            inputs, targets = task.make_batch(batch, mode="adapt")
            optimizer.zero_grad()
            task.loss(model(inputs, head="ssl"), targets).backward()
            optimizer.step()
        with torch.no_grad():
            model(torch.from_numpy(image.numpy()).permute(2, 0, 1)[None].float().div(255).to(device)).argmax(1).item()
    sync(device)
    return len(images_uint8) / (time.perf_counter() - started)


def timed(method, images, batch) -> tuple[float, float]:
    device = images.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for part in images.split(batch):
        method.adapt(part)
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return len(images) / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--episodic-samples", type=int, default=4096)
    parser.add_argument("--online-samples", type=int, default=4000)
    parser.add_argument("--reference-samples", type=int, default=20)
    parser.add_argument("--chunks", default="auto,256,512")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, task = reference_model(args.ckpt, device)
    generator = torch.Generator().manual_seed(0)
    images_uint8 = torch.randint(0, 256, (max(args.episodic_samples, args.online_samples), 32, 32, 3), generator=generator, dtype=torch.uint8)
    images = images_uint8.to(device).permute(0, 3, 1, 2).float().div(255)
    rows = []

    reference = images_uint8[: args.reference_samples]
    rows.append(("reference episodic (10x32, PIL aug)", reference_loop(model, task, reference, 10, 32, 1e-3, True, device), float("nan")))
    reference = images_uint8[: args.reference_samples * 5]
    rows.append(("reference online (1x32, PIL aug)", reference_loop(model, task, reference, 1, 32, 1e-3, False, device), float("nan")))
    print(rows, flush=True)

    for amp in (False, True):
        for chunk in args.chunks.split(","):
            config = EpisodicConfig(steps=10, copies=32, amp=amp, chunk=None if chunk == "auto" else int(chunk))
            method = EpisodicTTT(copy.deepcopy(model), task, config, torch.Generator(device=device).manual_seed(0))
            try:
                method.adapt(images[: min(64, len(images))])  # warm-up (and the automatic chunk size)
                rate, peak = timed(method, images[: args.episodic_samples], 4096)
                rows.append((f"tta episodic {'bf16' if amp else 'fp32'} chunk {method._chunk}", rate, peak))
            except torch.OutOfMemoryError:
                rows.append((f"tta episodic {'bf16' if amp else 'fp32'} chunk {chunk}", float("nan"), float("inf")))
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)

    for graph in (False, True):
        for amp in (False, True):
            config = OnlineConfig(steps=1, copies=32, amp=amp, cuda_graph=graph)
            generator = None if graph else torch.Generator(device=device).manual_seed(0)
            method = OnlineTTT(copy.deepcopy(model), task, config, classes=10, generator=generator)
            timed(method, images[:50], 1)
            rate, peak = timed(method, images[: args.online_samples], 1)
            rows.append((f"tta online {'graph' if graph else 'eager'} {'bf16' if amp else 'fp32'}", rate, peak))
            print(rows[-1], flush=True)
    config = OnlineConfig(steps=1, copies=32, cuda_graph=True)
    from tta_cli.adapt.policies import RollbackPolicy

    config.rollback = RollbackPolicy(enabled=True)
    method = OnlineTTT(copy.deepcopy(model), task, config, classes=10)
    timed(method, images[:50], 1)
    rate, peak = timed(method, images[: args.online_samples], 1)
    rows.append(("tta online graph bf16 + rollback", rate, peak))

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nadapt speed on {name} (ResNet-26 GN, split layer2, rotation, 32 copies)")
    print(f"{'path':<44} {'samples/s':>10} {'peak GiB':>9}")
    for label, rate, peak in rows:
        print(f"{label:<44} {rate:>10.1f} {peak:>9.2f}")


if __name__ == "__main__":
    main()

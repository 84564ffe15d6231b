"""Training: loss = CE(main head on clean images) + ssl_weight * L(ssl head on task inputs), jointly or in the
phases of train/phases.py (--init's, or probing's ssl pre-training then the main head alone).

GPU-resident data and augmentation, bf16 autocast + channels_last on CUDA, optional torch.compile.
The loop never prints: it reports through `on_event(kind, **values)` for the CLI to render.

Under torchrun (a joined process group, see `tta_cli.distributed`) the step's module (JointLoss, which
holds the model) is wrapped in DistributedDataParallel and every global batch of optim.batch_size is split over the ranks, image for
image as the single-process run would see it (same order, crops, flips and task draws); epoch metrics
are summed over ranks, only rank 0 writes files, and every rank evaluates the whole test set itself
(identical numbers everywhere, no extra communication, the same wall time as rank 0 alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tta_cli import distributed
from tta_cli.config import OptimConfig, TrainConfig, check_choice, check_range, to_dict
from tta_cli.data.augment import PAD_MODES
from tta_cli.data.imageset import ImageSet, to_float_nchw
from tta_cli.data.loader import DeviceLoader
from tta_cli.errors import TTAError
from tta_cli.models import TTTModel, build_model
from tta_cli.models.attach import load_classifier
from tta_cli.models.batchnorm import has_clean_stats_batchnorm, statistics_from_first
from tta_cli.tasks import build_task
from tta_cli.train import checkpoint, embedding_index
from tta_cli.train.init import Classifier, check_classes, check_init, init_metrics, normalization, read_classifier
from tta_cli.train.phases import Phase, check_probe, phase_at, phase_lr, set_phase
from tta_cli.train.schedule import lr_at

Events = Callable[..., None]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of uint8 (N, H, W, 3) images, computed in float64 chunks."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros(3, dtype=torch.float64, device=images.device)
    for chunk in images.split(8192):
        pixels = chunk.reshape(-1, 3).double() / 255.0
        total += pixels.sum(0)
        total_sq += pixels.pow(2).sum(0)
    count = images[..., 0].numel()
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


class JointLoss(nn.Module):
    """One step's loss, main_weight * CE(main head on clean images) + ssl_weight * L(ssl head on the task's inputs).

    How the encoder sees the two batches:
    - ssl_weight 0: the clean batch alone (a plain supervised model; the ssl head stays as built).
    - BatchNorm with `clean_statistics` (config bn_statistics "clean"): one pass over the clean batch and the
      views together, every row normalised with the clean rows' statistics (models/batchnorm.py), so the views
      never shape the statistics the main head is trained with, nor the running averages. Rotation `expand`
      views start with the 0-degree quarter, which is the clean batch itself.
    - Otherwise (per-sample norms): rotation `expand` runs the encoder once on the 4 rotations and the main
      head reads the 0-degree quarter; other tasks run a separate pass per head.
    """

    def __init__(self, model: TTTModel, task, ssl_weight: float, label_smoothing: float, clean_statistics: bool = False,
                 main_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.task = task
        self.ssl_weight = ssl_weight
        self.main_weight = main_weight  # 0: the main loss is only reported (probing's pre-training phase)
        self.label_smoothing = label_smoothing
        self.clean_statistics = clean_statistics and has_clean_stats_batchnorm(model)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, ssl_inputs: torch.Tensor, ssl_targets: torch.Tensor):
        main_logits, ssl_outputs = self.outputs(images, ssl_inputs)
        main_loss = nn.functional.cross_entropy(main_logits.float(), labels, label_smoothing=self.label_smoothing)
        correct = (main_logits.argmax(1) == labels).sum()
        if ssl_outputs is None:
            return main_loss, main_loss.detach(), torch.zeros_like(main_loss), correct
        ssl_loss = self.task.loss(ssl_outputs, ssl_targets)  # with main_weight 0 the main pass only gives train_acc
        total = self.ssl_weight * ssl_loss if self.main_weight == 0 else self.main_weight * main_loss + self.ssl_weight * ssl_loss
        return total, main_loss.detach(), ssl_loss.detach(), correct

    def outputs(self, images: torch.Tensor, ssl_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main logits of `images` and ssl outputs of `ssl_inputs` (None when the ssl loss has weight 0)."""
        batch = images.shape[0]
        if self.ssl_weight == 0:
            return self.model(images), None
        views_lead_with_clean = getattr(self.task, "mode", None) == "expand" and ssl_inputs.shape[0] == 4 * batch
        if views_lead_with_clean:
            features = self.model.features(ssl_inputs)
            return self.model.main_head(features[:batch]), self.model.ssl_head(features)
        if self.clean_statistics:
            features = self.model.features(torch.cat([images, ssl_inputs]))
            return self.model.main_head(features[:batch]), self.model.ssl_head(features[batch:])
        return self.model(images), self.model.ssl(ssl_inputs)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, optim: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """SGD over every parameter, or AdamW with no weight decay on biases, norms and embeddings of one dimension (as
    MAE's `add_weight_decay`; the ViT's position embedding and class token are decayed, as timm's ViTs)."""
    fused_flag = {"fused": True} if fused else {}
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov, **fused_flag
        )
    decayed = [param for param in model.parameters() if param.dim() > 1]
    undecayed = [param for param in model.parameters() if param.dim() <= 1]
    groups = [{"params": decayed, "weight_decay": optim.weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), **fused_flag)


def make_step(model: TTTModel, task, config: TrainConfig, device: torch.device, phase: Phase, new_phase: bool = False) -> nn.Module:
    """The step's loss module for `phase`, under DistributedDataParallel with several ranks and torch.compile when
    asked. Made again when the phase changes which parameters train (`new_phase`): DDP fixes them when it wraps, and
    Dynamo does not guard on a parameter's requires_grad (pytorch/pytorch#139476), so without a reset some torch
    versions replay the frozen phase's graph, whose backward leaves the encoder and main head without gradients."""
    if new_phase and config.compile:
        torch._dynamo.reset()
    step_loss = JointLoss(model, task, phase.ssl_weight, config.optim.label_smoothing, config.bn_statistics == "clean", phase.main_weight)
    if distributed.world_size() > 1:  # averages the gradients over ranks during backward
        step_loss = DistributedDataParallel(step_loss, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return torch.compile(step_loss, mode=config.compile_mode) if config.compile else step_loss


@torch.no_grad()
def evaluate(model: TTTModel, task, test: ImageSet, device: torch.device, batch_size: int = 1000, amp: bool = True) -> dict:
    """Main-head accuracy and ssl quality (rotation accuracy over all four rotations, or masked MSE).
    NaN/inf outputs mean training diverged (even when every loss seen so far was finite): a user error."""
    model.eval()
    correct = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device, dtype=torch.long)
    ssl_score = torch.zeros((), device=device, dtype=torch.float64)
    ssl_count = 0
    generator = torch.Generator(device=device).manual_seed(1234)
    use_amp = amp and device.type == "cuda"
    for start in range(0, len(test), batch_size):
        images = to_float_nchw(test.images[start : start + batch_size].to(device, non_blocking=True))
        labels = test.labels[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(images)
            correct += (logits.argmax(1) == labels).sum()
            nonfinite += (~logits.isfinite()).any(1).sum()
            mode = "train" if task.name == "rotation" else "adapt"
            ssl_inputs, ssl_targets = task.make_batch(images, mode=mode, generator=generator)
            scores = task.score(model.ssl(ssl_inputs), ssl_targets)
        ssl_score += scores.double().sum()
        ssl_count += scores.shape[0]
    model.train()
    if int(nonfinite):
        raise TTAError(
            f"training diverged: the model gives NaN/inf outputs on {int(nonfinite)} of {len(test)} test images; "
            "lower optim.lr or check the data. Nothing was overwritten."
        )
    metrics = {"test_acc": float(correct) / len(test)}
    if task.name == "rotation":
        metrics["test_ssl_acc"] = float(ssl_score) / ssl_count
    else:
        metrics["test_ssl_mse"] = -float(ssl_score) / ssl_count
    return metrics


def check_config(config: TrainConfig, resume: bool = False, force: bool = False, classifier: Classifier | None = None) -> None:
    """Fail before any data is read or file written: unknown backbone/task/split/schedule, bad sizes, an --init
    classifier that does not fit the model, or an existing checkpoint in `config.out` (building the model on the CPU
    validates the architecture). `classifier`: the --init one when already read."""
    check_range("optim.epochs", config.optim.epochs, 0 if config.init.weights else 1)  # --init --epochs 0: the classifier as is
    check_range("optim.batch_size", config.optim.batch_size, 1)
    for name in ("lr", "weight_decay", "ssl_weight", "warmup_epochs", "gamma"):
        check_range(f"optim.{name}", getattr(config.optim, name), 0)
    for name in ("momentum", "label_smoothing"):
        check_range(f"optim.{name}", getattr(config.optim, name), 0, 1)
    check_choice("optim.optimizer", config.optim.optimizer, OPTIMIZERS)
    if len(config.optim.betas) != 2:
        raise TTAError(f"optim.betas is two numbers, as [0.9, 0.999], got {config.optim.betas}")
    for beta in config.optim.betas:
        check_range("optim.betas", beta, 0, 1)
    clip = config.optim.clip_grad_norm
    if clip is not None and not clip > 0:
        raise TTAError(f"optim.clip_grad_norm must be above 0 (or null for no clip), got {clip}")
    if config.optim.batch_size % distributed.world_size():
        raise TTAError(
            f"optim.batch_size {config.optim.batch_size} does not split evenly over {distributed.world_size()} torchrun processes; "
            "use a multiple of --nproc-per-node (the batch size is the global batch)"
        )
    lr_at(config.optim, 0.0)
    if config.compile_mode not in COMPILE_MODES:
        raise TTAError(f"unknown compile_mode {config.compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
    if config.bn_statistics not in ("all", "clean"):
        raise TTAError(f"unknown bn_statistics {config.bn_statistics!r}; choose all or clean")
    if config.data.pad_mode not in PAD_MODES:
        raise TTAError(f"unknown data.pad_mode {config.data.pad_mode!r}; choose one of: {', '.join(PAD_MODES)}")
    build_model(config.model, build_task(config.task))
    check_probe(config)
    if config.init.weights is not None and not resume:
        check_init(config, classifier or read_classifier(config.init.weights), build_task(config.task))
    refuse_overwrite(Path(config.out), resume, force)


def check_data(config: TrainConfig, train_set: ImageSet, test_set: ImageSet) -> None:
    """The splits agree on the classes and hold at least one training batch."""
    if test_set.class_names != train_set.class_names:
        raise TTAError(f"train and test class names differ: {train_set.class_names} vs {test_set.class_names}")
    if len(train_set) < config.optim.batch_size:
        raise TTAError(
            f"only {len(train_set)} training images, fewer than one batch (optim.batch_size {config.optim.batch_size}); "
            "lower --batch-size or use more data"
        )


def refuse_overwrite(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished checkpoint unless asked; --resume needs the resume state. The folder must be
    writable now (not after the first epoch), and --resume with --force is a contradiction (continue or replace?)."""
    from tta_cli.outputs import check_out_folder
    from tta_cli.validation import refuse_together

    if resume and force:
        refuse_together("--resume", "--force", "--resume continues the checkpoint in --out, --force replaces it")
    holds_checkpoint = (out_dir / checkpoint.META).exists() or (out_dir / checkpoint.RESUME).exists()
    if holds_checkpoint and not resume and not force:
        raise TTAError(f"{out_dir} already holds a checkpoint; use --resume to continue it, --force to overwrite, or another --out")
    # a folder of other files: refused unless --force, which then writes the checkpoint beside them (deleting nothing)
    check_out_folder(out_dir, force or resume or holds_checkpoint, "--out")


def drop_replaced_checkpoint(out_dir: Path) -> None:
    """--force: once the new run's first resume.pt is written, remove the old run's weights and model.yaml, so the
    folder never pairs the old checkpoint with the new run's state (an interrupted forced run leaves only resume.pt)."""
    for name in (checkpoint.WEIGHTS, checkpoint.META):
        (out_dir / name).unlink(missing_ok=True)


def prepare_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    refuse_overwrite(out_dir, resume, force)
    out_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig,
    train_set: ImageSet,
    test_set: ImageSet,
    device: torch.device,
    resume: bool = False,
    force: bool = False,
    on_event: Events = lambda kind, **values: None,
) -> TrainResult:
    """Train a TTTModel (jointly, or in the phases of train/phases.py) and write its checkpoint to `config.out` (rank 0 writes; every rank returns the result)."""
    out_dir = Path(config.out)
    classifier = read_classifier(config.init.weights) if config.init.weights is not None and not resume else None
    check_config(config, resume, force, classifier)
    check_data(config, train_set, test_set)
    config.model.num_classes = len(train_set.class_names)
    if classifier is not None:
        check_classes(classifier, config, train_set.class_names)
    prepare_out_dir(out_dir, resume, force)
    torch.manual_seed(config.seed)
    rank, world_size = distributed.rank(), distributed.world_size()
    shard = (rank, world_size) if world_size > 1 else None  # this rank's rows of each global batch

    task = build_task(config.task)
    on_gpu = device.type == "cuda"
    train_images = train_set.images.to(device)
    mean, std = channel_stats(train_images)
    if classifier is not None:
        mean, std = normalization(config.init, classifier, mean, std)
    model = build_model(config.model, task, mean, std).to(device)
    if classifier is not None:
        load_classifier(model, classifier.state, config.model, classifier.where)
    if on_gpu and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.optim, on_gpu)
    loader = DeviceLoader(
        ImageSet(train_images, train_set.labels.to(device), train_set.class_names),
        batch_size=config.optim.batch_size // world_size,
        device=device,
        augment=True,
        pad_mode=config.data.pad_mode,
        seed=config.seed,
        drop_last=True,
        rank=rank,
        world_size=world_size,
    )
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)  # the task's random draws
    start_epoch, history = 0, []
    before = evaluate(model, task, test_set, device, amp=config.amp) if classifier is not None else {}  # the classifier as given
    if resume:
        state = checkpoint.load_resume(out_dir)
        checkpoint.load_state(model, state["model"], str(out_dir / checkpoint.RESUME))
        optimizer.load_state_dict(state["optimizer"])
        if "task_rng" in state:
            generator.set_state(state["task_rng"])
        start_epoch, history, before = state["epoch"], state["history"], state.get("init_before", {})
        on_event("resumed", epoch=start_epoch)

    clean_statistics = config.bn_statistics == "clean"
    use_amp = config.amp and on_gpu
    steps_per_epoch = len(loader)
    # seconds count training time over every process of a run: a resumed run goes on from the saved total
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    metrics: dict = history[-1] if history else {}
    on_event("start", epochs=config.optim.epochs, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch)
    compiled_loss, current = None, None
    for epoch in range(start_epoch, config.optim.epochs):
        loader.set_epoch(epoch)
        phase = phase_at(config, epoch)
        set_phase(model, phase)  # every epoch: evaluate leaves the whole model in training mode
        if phase != current:  # a new phase trains other parameters
            if epoch > 0 and epoch == phase.start:  # a later phase's first epoch, resumed or not
                optimizer.state.clear()  # each phase starts its own schedule with fresh optimizer state (and a
                # fused SGD needs momentum buffers for all of its parameters or for none)
            compiled_loss, current = make_step(model, task, config, device, phase, new_phase=compiled_loss is not None), phase
        totals = torch.zeros(4, device=device)  # loss sum, main loss sum, ssl loss sum, correct
        seen = 0
        for step, (images, labels) in enumerate(loader):
            lr = phase_lr(config.optim, phase, epoch + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ssl_inputs, ssl_targets = task.make_batch(images, mode="train", generator=generator, shard=shard)
            if on_gpu and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
                ssl_inputs = ssl_inputs.contiguous(memory_format=torch.channels_last)
            clean_rows = images.shape[0] if clean_statistics else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp), statistics_from_first(model, clean_rows):
                loss, main_loss, ssl_loss, correct = compiled_loss(images, labels, ssl_inputs, ssl_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm, foreach=on_gpu)
            optimizer.step()
            totals += torch.stack([loss.detach(), main_loss, ssl_loss, correct.float()])
            seen += labels.shape[0]
            on_event("step", epoch=epoch, step=step, lr=lr, loss=loss.detach())  # loss: this rank's batch mean, on the device
        weights_finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
        epoch_sums = distributed.sum_over_ranks(torch.cat([totals, torch.stack([weights_finite.float(), totals.new_tensor(seen)])]))
        loss_sum, main_sum, ssl_sum, correct_sum, finite, seen = epoch_sums.tolist()  # one sync per epoch
        loss_sum, main_sum, ssl_sum = loss_sum / world_size, main_sum / world_size, ssl_sum / world_size  # equal shards: mean of means
        if not (math.isfinite(loss_sum) and finite == world_size):
            raise TTAError(
                f"training diverged: loss or weights became NaN/inf in epoch {epoch + 1}; lower optim.lr (now {config.optim.lr}) "
                "or check the data. Nothing was overwritten."
            )
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / steps_per_epoch,
            "train_main_loss": main_sum / steps_per_epoch,
            "train_ssl_loss": ssl_sum / steps_per_epoch,
            "train_acc": correct_sum / seen,
            "seconds": time.perf_counter() - started,
        }
        last = epoch + 1 == config.optim.epochs
        if last or (config.eval_every > 0 and (epoch + 1) % config.eval_every == 0):
            record.update(evaluate(model, task, test_set, device, amp=config.amp))
        history.append(record)
        metrics = record
        on_event("epoch", **record)
        if distributed.is_main():
            checkpoint.save_resume(
                out_dir, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": to_dict(config),
                    "task_rng": generator.get_state(),
                    "init_before": before,
                }
            )
            if force and epoch == start_epoch:
                drop_replaced_checkpoint(out_dir)
    seconds = time.perf_counter() - started
    if not history:  # --init --epochs 0: the classifier as given
        metrics = {"epoch": 0, **before}
    images_seen = config.optim.epochs * steps_per_epoch * config.optim.batch_size  # clean images, all ranks
    final = dict(metrics, train_seconds=seconds, train_images_per_s=images_seen / max(seconds, 1e-9), device=str(device))
    if before:
        final.update(init_metrics(before, metrics))
    model = model.to(memory_format=torch.contiguous_format)
    if distributed.is_main():
        checkpoint.save_model(out_dir, model, config, train_set.class_names, final)
        embedding_index.write_index(out_dir, model, train_set)  # the neighbours of ttt-nn
    distributed.barrier()  # the checkpoint is complete when train returns, on every rank
    return TrainResult(out_dir, final, history, seconds)

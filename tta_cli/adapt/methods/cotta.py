"""CoTTA (Wang et al. 2022), continual test-time adaptation: a student learns from a mean teacher's pseudo-labels
(averaged over augmentations when the source model is unsure), and every weight element returns to its source value
with a small probability at every step, so that a long stream cannot wander far from the source."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.batch import BatchMethod
from tta_cli.adapt.methods.norm import batch_statistics_if_any
from tta_cli.data.cotta_augment import cotta_augment
from tta_cli.errors import TTAError


@dataclass
class CottaSettings:
    lr: float = 1e-3  # Adam learning rate (the authors' CIFAR-10 config)
    batch: int = 200  # test samples per batch and update (ibid.)
    beta: float = 0.9  # Adam's first-moment decay (ibid.; the second is 0.999)
    teacher_momentum: float = 0.999  # mean teacher: weight of its past in the EMA of the student
    restore_probability: float = 0.01  # chance, per weight element and step, of going back to the source value
    anchor_threshold: float = 0.92  # average the teacher over augmentations when the source's mean confidence is below
    augmentations: int = 32  # augmented teacher passes averaged


def trainable(model) -> list[torch.nn.Parameter]:
    return [*model.encoder.parameters(), *model.main_head.parameters()]


@register
class CoTTA(BatchMethod):
    name = "cotta"
    semantics = (
        "CoTTA, mean-teacher self-training for continual streams. Per batch: the teacher's logits, averaged over "
        "`augmentations` augmented views (colour jitter, affine, blur, flip, noise) when the source model's mean "
        "confidence is below anchor_threshold, are the prediction and the soft pseudo-label; one Adam step of the "
        "student on its cross-entropy; teacher = EMA of the student; then each weight element returns to its source "
        "value with probability restore_probability. All parameters train; BatchNorm with batch statistics."
    )
    updates = "every parameter of encoder + main head (student; the teacher is its EMA), stochastically restored"
    default_batch = 200
    Settings = CottaSettings
    limits = {"lr": (0, None), "batch": (1, None), "beta": (0, 1), "augmentations": (1, None)}

    def __init__(self, model, task, settings, common, classes, device):
        super().__init__(model, task, settings, common, classes, device)
        for field in ("teacher_momentum", "restore_probability", "anchor_threshold"):
            if not 0 <= getattr(settings, field) <= 1:
                raise TTAError(f"cotta.{field} must be in [0, 1], got {getattr(settings, field)}")
        batch_statistics_if_any(model)
        self.train_only(trainable(model))
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.anchor = copy.deepcopy(model).requires_grad_(False)  # the source model, never updated
        self.teacher_params = trainable(self.teacher)
        self.use_optimizer(torch.optim.Adam(self.params, lr=settings.lr, betas=(settings.beta, 0.999)))
        self.generator = torch.Generator(device=device).manual_seed(common.seed)
        self.augmented = 0

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.pseudo_labels(images)
        student_logits = self.model(images)
        loss = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_teacher_and_restore()
        return teacher_logits

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, averaged over augmented views when the source model is unsure of the batch."""
        confidence = self.anchor(images).softmax(1).amax(1).mean()
        if confidence >= self.settings.anchor_threshold:
            return self.teacher(images)
        self.augmented += 1
        views = [self.teacher(cotta_augment(images, self.generator)) for _ in range(self.settings.augmentations)]
        return torch.stack(views).mean(0)

    @torch.no_grad()
    def update_teacher_and_restore(self) -> None:
        momentum = self.settings.teacher_momentum
        for teacher, student, source in zip(self.teacher_params, self.params, self.source, strict=True):
            teacher.mul_(momentum).add_(student, alpha=1 - momentum)
            restore = torch.rand(student.shape, generator=self.generator, device=student.device) < self.settings.restore_probability
            student.copy_(torch.where(restore, source, student))

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            for teacher, source in zip(self.teacher_params, self.source, strict=True):
                teacher.copy_(source)

    def counters(self) -> dict[str, int]:
        return {"augmented_batches": self.augmented}

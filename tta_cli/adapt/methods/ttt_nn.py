"""Nearest-neighbour TTT (after Hardt & Sun 2023, "Test-time training on nearest neighbors for large language
models"): each test sample retrieves the `neighbours` training images closest to it (cosine of the encoder's pooled
features, exact: train/embedding_index.py) and takes `steps` supervised SGD steps on them (their labels are known),
optionally plus `ssl_weight` times its own self-supervised loss; then it is predicted and the weights reset.

The training images come from the checkpoint's recorded data source (data.source, limit_train and seed of its
model.yaml, as `tta train` loaded them) or from `train_data`; the index is the one `tta train` wrote beside the
checkpoint, or built in memory when there is none that matches. Samples are adapted a chunk at a time, each on its
own weights (engine/per_sample.py), as `ttt` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tta_cli.adapt.methods import register
from tta_cli.adapt.methods.base import Method
from tta_cli.config import check_range
from tta_cli.data.imageset import to_float_nchw
from tta_cli.engine.execution import CPU_CHUNK, CUDA_CHUNK, resolve
from tta_cli.engine.per_sample import PerSampleLoss, sgd_step
from tta_cli.errors import TTAError
from tta_cli.models.features import pooled_features
from tta_cli.models.params import adapted_parameter_names
from tta_cli.tasks.views import grouped_views
from tta_cli.train.embedding_index import training_index


@dataclass
class TTTNNSettings:
    neighbours: int = 16  # k training images retrieved per test sample
    steps: int = 5  # supervised SGD steps on them per sample; the shared --steps overrides it
    lr: float = 0.01  # SGD learning rate of those steps (the shared --lr is the ssl updates')
    ssl_weight: float = 0.0  # weight of the test sample's own ssl loss on `copies` views (0: none)
    train_data: str | None = None  # the training images; None: the checkpoint's recorded data.source
    checkpoint: str | None = None  # the checkpoint folder holding the index; `tta adapt` fills in --ckpt


@register
class TTTNN(Method):
    name = "ttt-nn"
    episodic = True
    semantics = (
        "Nearest-neighbour TTT, each sample trained on its nearest training images. Per sample: retrieve the "
        "`neighbours` training images of highest cosine similarity (the encoder's pooled features, exact), `steps` SGD "
        "steps on their cross-entropy (+ `ssl_weight` x the sample's ssl loss), predict, reset. Nothing carries over."
    )
    updates = "the `params` group (default: the encoder), per sample"
    moves_params = True
    Settings = TTTNNSettings

    def __init__(self, model, task, settings, common, classes, device):
        for field, low in (("neighbours", 1), ("steps", 0), ("lr", 0), ("ssl_weight", 0)):
            check_range(f"ttt-nn.{field}", getattr(settings, field), low)
        if settings.checkpoint is None:
            raise TTAError("ttt-nn needs its checkpoint folder (ttt-nn.checkpoint; tta adapt sets it to --ckpt)")
        super().__init__(model.eval(), task, settings, common, classes, device)
        execution = resolve(common, device)
        self.amp = execution.amp("episodic")
        self.chunk = execution.chunk or (CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK)
        self.steps = settings.steps if common.steps is None else common.steps
        self.train_set, self.index = training_index(settings.checkpoint, model, settings.train_data, device)
        if settings.neighbours > len(self.train_set):
            raise TTAError(f"ttt-nn.neighbours is {settings.neighbours} but the training data holds {len(self.train_set)} images")
        self.functions = PerSampleLoss(model, adapted_parameter_names(model, common.params), self.loss, self.amp)
        self.generator = torch.Generator(device=device).manual_seed(common.seed)

    def loss(self, forward, neighbours: torch.Tensor, labels: torch.Tensor, *views: torch.Tensor) -> torch.Tensor:
        """One sample's loss: cross-entropy of the main head on its neighbours (k, C, H, W) with their labels (k,),
        plus ssl_weight x the ssl loss of its own views when given."""
        supervised = F.cross_entropy(forward(neighbours).float(), labels)
        if not views:
            return supervised
        inputs, targets = views
        return supervised + self.settings.ssl_weight * self.task.loss(forward(inputs, "ssl"), targets)

    def retrieve(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (S, C, H, W) -> their neighbours (S, k, C, H, W) in [0, 1] and labels (S, k)."""
        with torch.no_grad():
            rows = self.index.nearest(pooled_features(self.model, images), self.settings.neighbours)  # (S, k)
        neighbours = to_float_nchw(self.train_set.images[rows.flatten()]).to(images.dtype)
        return neighbours.view(*rows.shape, *neighbours.shape[1:]), self.train_set.labels[rows]

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adapt_chunk(part) for part in images.split(self.chunk)])

    def adapt_chunk(self, images: torch.Tensor) -> torch.Tensor:
        """images (S, C, H, W) -> logits (S, classes): each sample's own steps on its neighbours, then its prediction."""
        neighbours, labels = self.retrieve(images)
        params = self.functions.repeated_source(images.shape[0])
        velocity = [torch.zeros_like(p) for p in params] if self.common.momentum else None
        for _ in range(self.steps):
            views = grouped_views(self.task, images, self.common.copies, self.generator) if self.settings.ssl_weight else ()
            grads = self.functions.loss_gradients(params, neighbours, labels, *views)
            sgd_step(params, velocity, grads, self.settings.lr, self.common.momentum, None)
        return self.functions.predict(params, images)

    def batch_size(self, sample: torch.Tensor) -> int:
        return 4 * self.chunk

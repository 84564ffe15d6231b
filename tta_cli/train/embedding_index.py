"""The embedding index of a checkpoint's training images, for nearest-neighbour TTT (`ttt-nn`).

`tta train` writes `embeddings.safetensors` beside the checkpoint: the encoder's pooled features of every training
image (models.features.pooled_features) in fp16, their labels, and the SHA-256 of the weights they were computed with.
An older checkpoint, or one whose weights changed since (--save-adapted), has no matching index: `training_index`
then builds it in memory from the training images, which it needs anyway (ttt-nn trains on them). Retrieval is exact:
cosine similarity by one matrix product with every training embedding, then top-k, on the device (50,000 x 64 fp32 is
a 13 MB matrix: a brute-force product beats any approximate index at this size and needs no extra package).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from tta_cli.config import TrainConfig, from_dict
from tta_cli.data.imageset import ImageSet, to_float_nchw
from tta_cli.errors import TTAError
from tta_cli.files import write_bytes
from tta_cli.models.features import pooled_features
from tta_cli.train.checkpoint import WEIGHTS, read_bytes, read_meta, resolve_checkpoint, weights_metadata

INDEX = "embeddings.safetensors"
WEIGHTS_HASH_KEY = "weights_sha256"


@dataclass
class EmbeddingIndex:
    """embeddings (N, D) fp16 and labels (N,) of N training images, on one device."""

    embeddings: torch.Tensor
    labels: torch.Tensor

    def nearest(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Rows (Q, k) of the k training embeddings of highest cosine similarity with each query (Q, D), best first."""
        keys = F.normalize(self.embeddings.float(), dim=1)
        return (F.normalize(queries.float(), dim=1) @ keys.T).topk(k, dim=1).indices


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> fp16 (N, D) pooled encoder features, in eval mode (on the model's device)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = [pooled_features(model, to_float_nchw(part.to(device))).half() for part in images.split(batch)]
    model.train(was_training)
    return torch.cat(features)


def weights_hash(folder: Path) -> str:
    return hashlib.sha256(read_bytes(folder / WEIGHTS)).hexdigest()


def write_index(folder: str | Path, model: torch.nn.Module, train_set: ImageSet) -> Path:
    """Embed `train_set` with `model` (the checkpoint's weights, already saved in `folder`) and write the index there."""
    folder = Path(folder)
    tensors = {"embeddings": embed(model, train_set.images).cpu(), "labels": train_set.labels.cpu().contiguous()}
    return write_bytes(folder / INDEX, save(tensors, metadata={WEIGHTS_HASH_KEY: weights_hash(folder)}))


def read_index(folder: Path) -> EmbeddingIndex | None:
    """The index beside the checkpoint, or None when there is none or it was computed with other weights."""
    path = folder / INDEX
    if not path.is_file():
        return None
    data = read_bytes(path)
    if weights_metadata(data).get(WEIGHTS_HASH_KEY) != weights_hash(folder):
        return None
    tensors = load(data)
    return EmbeddingIndex(tensors["embeddings"], tensors["labels"])


def training_index(checkpoint: str | Path, model: torch.nn.Module, train_data: str | None, device: torch.device) -> tuple[ImageSet, EmbeddingIndex]:
    """The checkpoint's training images (from `train_data`, or the source, limit and seed recorded in its config) on
    `device`, and their index: the stored one when it matches these images and weights, else built now."""
    from tta_cli.data.sources import load_split

    folder = resolve_checkpoint(checkpoint)
    meta = read_meta(folder)
    config = from_dict(TrainConfig, meta["config"])
    source = train_data or config.data.source
    limit = None if train_data else config.data.limit_train
    train_set = load_split(source, "train", root=config.data.root, limit=limit, seed=config.seed, image_size=config.model.img_size)
    if train_set.class_names != list(meta["class_names"]):
        raise TTAError(f"ttt-nn: the classes of the training data {source} differ from checkpoint {folder}'s; give ttt-nn.train_data")
    index = read_index(folder)
    if index is None or not torch.equal(index.labels, train_set.labels):
        index = EmbeddingIndex(embed(model, train_set.images.to(device)), train_set.labels)
    train_set = ImageSet(train_set.images.to(device), train_set.labels.to(device), train_set.class_names, train_set.meta)
    return train_set, EmbeddingIndex(index.embeddings.to(device), index.labels.to(device))

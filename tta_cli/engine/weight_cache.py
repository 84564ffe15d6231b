"""The adapted-weight cache of episodic TTT: a sample whose source embedding is close to a recently adapted sample's
(cosine >= tau) takes that sample's adapted weights instead of adapting. Consecutive frames of one scene, or near
duplicates, then cost one forward pass each instead of `steps` forward and backward passes over `copies` views.

The embedding is the encoder's pooled output under the source weights (models.features.pooled_features). Samples
are decided in order, as if one at a time: a sample reuses the most similar of the cached samples and of the earlier
adapted samples of its own batch; the rest (the "leaders") are adapted together, in chunks, and then cached,
evicting the oldest beyond `size`. So tau > 1 never hits (every sample adapts, exactly as without the cache), and
tau = -1 adapts the first sample only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta_cli.models.features import pooled_features


class WeightCache:
    """Unit source embeddings (M, D) of the last `size` adapted samples and their adapted weights ((M, *shape) each)."""

    def __init__(self, tau: float, size: int):
        self.tau, self.size = tau, size
        self.keys: torch.Tensor | None = None
        self.weights: list[torch.Tensor] = []
        self.hits = self.lookups = 0

    def counters(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_lookups": self.lookups}

    def plan(self, keys: torch.Tensor) -> tuple[list[int], list[int]]:
        """For keys (B, D) in order: (leaders: the rows to adapt, source (B,): for every row the index of the weights it
        uses in the pool of the cached samples followed by this batch's leaders). One device-to-host copy."""
        cached = 0 if self.keys is None else self.keys.shape[0]
        candidates = keys if self.keys is None else torch.cat([self.keys, keys])
        similarity = (keys @ candidates.T).cpu()  # (B, cached + B)
        usable = torch.zeros(similarity.shape[1], dtype=torch.bool)
        usable[:cached] = True
        leaders, source, pool_index = [], [], {column: column for column in range(cached)}  # column -> pool index
        for row in range(keys.shape[0]):
            scores = similarity[row].masked_fill(~usable, -float("inf"))
            best = int(scores.argmax())
            if float(scores[best]) >= self.tau:
                source.append(pool_index[best])
                continue
            usable[cached + row] = True
            pool_index[cached + row] = cached + len(leaders)
            source.append(cached + len(leaders))
            leaders.append(row)
        return leaders, source

    def adapt(self, episodes, images: torch.Tensor, chunk: int) -> torch.Tensor:
        """`episodes.adapt(images)` (an EpisodicTTT) with reuse: logits (B, classes)."""
        with torch.no_grad():
            keys = F.normalize(pooled_features(episodes.model, images).float(), dim=1)
        leaders, source = self.plan(keys)
        followers = sorted(set(range(images.shape[0])) - set(leaders))
        self.lookups += images.shape[0]
        self.hits += len(followers)
        outputs, new_weights = [], []
        if leaders:  # adapted as episodic TTT adapts any chunk
            parts = [episodes.adapt_chunk_and_weights(part) for part in images[leaders].split(chunk)]
            outputs += [logits for logits, _ in parts]
            new_weights = [torch.cat(per_name) for per_name in zip(*(weights for _, weights in parts), strict=True)]
        if followers:  # predicted on the weights they reuse
            pool = self._pool(new_weights)
            index = torch.tensor([source[row] for row in followers], device=images.device)
            for start in range(0, len(followers), chunk):
                part = index[start : start + chunk]
                outputs.append(episodes.predict_with([weights[part] for weights in pool], images[followers[start : start + chunk]]))
        if leaders:
            self.store(keys[leaders], new_weights)
        order = torch.tensor(leaders + followers, device=images.device)
        return torch.cat(outputs)[torch.argsort(order)]

    def _pool(self, new_weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """The cached weights followed by this batch's leaders' (per adapted name)."""
        if self.keys is None:
            return new_weights
        if not new_weights:
            return self.weights
        return [torch.cat([old, new]) for old, new in zip(self.weights, new_weights, strict=True)]

    def store(self, keys: torch.Tensor, weights: list[torch.Tensor]) -> None:
        """Append the adapted samples, keeping the most recent `size`."""
        if self.keys is None:
            self.keys, self.weights = keys[-self.size :], [w[-self.size :] for w in weights]
            return
        self.keys = torch.cat([self.keys, keys])[-self.size :]
        self.weights = [torch.cat([old, new])[-self.size :] for old, new in zip(self.weights, weights, strict=True)]

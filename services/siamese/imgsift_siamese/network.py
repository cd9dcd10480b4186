"""The Siamese network: one shared embedding branch, compared by Euclidean distance.

Both inputs pass through the same branch (MobileNet trunk -> global average pooling ->
projection head -> L2 normalisation), so the embeddings are unit vectors and

    distance(a, b) = ||e(a) - e(b)||_2 = sqrt(2 - 2 cos(e(a), e(b))),  in [0, 2].

0 means the same direction, sqrt(2) orthogonal, 2 opposite. The head is ``nn.Identity()``
until one is trained on a job's references; the distance is defined the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiameseNetwork(nn.Module):
    """A shared embedding branch; ``forward`` returns the distance between two batches of images."""

    def __init__(self, trunk: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head if head is not None else nn.Identity()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features ``(n, f)`` of preprocessed images ``(n, 3, h, w)``: what the head reads."""
        return self.pool(self.trunk(images)).flatten(1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(n, d)`` of pooled trunk features: the head, then L2 normalisation."""
        return F.normalize(self.head(features), dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(n, d)`` of a batch of preprocessed images ``(n, 3, h, w)``."""
        return self.embed_features(self.features(images))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance ``(n,)`` between ``a[i]`` and ``b[i]``, in [0, 2]."""
        return torch.linalg.vector_norm(self.embed(a) - self.embed(b), dim=1)

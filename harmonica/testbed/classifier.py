"""A small Fashion-MNIST CNN whose penultimate layer is the feature space of FID-FMNIST.

No Inception weights are available offline, so the Frechet distance is measured in the features of a
classifier trained on the same data: not comparable with published FIDs, but a true distance between
the generated and the real image distributions.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


class FMNISTClassifier(nn.Module):
    """Input: ``(N, 1, 28, 28)`` in [-1, 1] (the DiT's output range). ``features`` gives the
    ``FEATURE_DIM``-d penultimate activations, ``forward`` the 10 class logits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),          # 14x14
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),         # 7x7
            *conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

"""Small Fashion-MNIST CNNs that judge the testbed's samples.

Two classifiers, of different architectures and trained differently:

* ``"fid"``: the feature space of FID-FMNIST and precision/recall. Trained with random shifts and
  label smoothing, so its features do not hinge on pixel-exact alignment.
* ``"strict"``: a different network (``FlatCNN``: two convolutions and a fully connected layer over
  the whole 7x7 feature map, no batch norm, no global pooling), trained without augmentation or
  label smoothing, on a different seed. A forgiving classifier recognises blurred or patchy samples
  that a plain one does not; the strict one measures whether samples look like the data the way the
  data itself looks. Its head sees where every feature is, so misplaced strokes and patch-grid
  artifacts cost it, where global average pooling forgives them: the FID architecture trained
  without augmentation (6 epochs, 92.5% test accuracy) still recognised 86.3% of the first testbed
  DiT's samples, 93% of its test accuracy, against the 77%-of-91% the issue reported for an
  independent plain classifier.

No Inception weights are available offline, so the Frechet distance is measured in the features of a
classifier trained on the same data: not comparable with published FIDs, but a true distance between
the generated and the real image distributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_DIM = 128


@dataclass(frozen=True)
class ClassifierRecipe:
    """How one bundled classifier is trained, and where its weights live in the assets folder."""

    name: str
    arch: str            # "gap": FMNISTClassifier; "flat": FlatCNN
    file: str            # weights in harmonica/testbed/assets/
    max_shift: int       # random shifts of up to this many pixels (0: no augmentation)
    label_smoothing: float
    epochs: int
    seed_offset: int     # added to --seed: the two classifiers start from different initialisations


RECIPES = {
    "fid": ClassifierRecipe("fid", "gap", "classifier.safetensors", max_shift=2, label_smoothing=0.05, epochs=4,
                            seed_offset=0),
    "strict": ClassifierRecipe("strict", "flat", "classifier_strict.safetensors", max_shift=0,
                               label_smoothing=0.0, epochs=8, seed_offset=1),
}


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


class FlatCNN(nn.Module):
    """conv 32 - pool - conv 64 - pool - flatten (64 x 7 x 7) - 128 - 10, ReLU, dropout 0.3 before each
    linear layer; no batch norm, no global pooling. Same interface as ``FMNISTClassifier``."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),     # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),    # 7x7
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(recipe_name: str) -> nn.Module:
    """A fresh (untrained) network of the named recipe's architecture."""
    arch = RECIPES[recipe_name].arch
    return {"gap": FMNISTClassifier, "flat": FlatCNN}[arch]()

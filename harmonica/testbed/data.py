"""Fashion-MNIST, read straight from the IDX files Debian's ``dataset-fashion-mnist`` installs.

Reading the IDX format ourselves (it is a tiny header plus raw bytes) keeps the testbed free of any
dataset library and of network access: the files are either on disk or the error says how to get them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "HARMONICA_FMNIST_DIR"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, a type code (0x08 = uint8) and the number of dimensions.
_IDX_UBYTE = 0x08


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, the header says {ndim}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header promises {count} bytes of data, file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install the data with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point {ENV_VAR} at a directory "
        f"holding the four IDX files (train/t10k images-idx3-ubyte and labels-idx1-ubyte, gzipped or not)."
    )


def load_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 ``(N, 28, 28)`` and labels as uint8 ``(N,)`` for ``split`` in {"train", "test"}."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_dir()
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), 3)
    labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` in [-1, 1], the range the DiT is trained on."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1)


def load_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``(N, 1, 28, 28)`` in [-1, 1] and labels as int64 ``(N,)``."""
    images, labels = load_split(split)
    return to_tensor(images), torch.from_numpy(labels.astype(np.int64))

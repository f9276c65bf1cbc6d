"""Training checkpoints, in harmonica's one file format (harmonica.formats: atomic, fsynced, no pickle).

A checkpoint holds everything the next iteration depends on: router logits, the AdamW moments and
step count, the IEPO lambda, beta and the iteration counter. Randomness needs no saved state (see
harmonica.train.distributed), so resuming reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import formats

FILE_NAME = "checkpoint.safetensors"
KIND = "train_checkpoint"
# Settings that may change between an interrupted run and its resumption without changing the result.
_RESUMABLE_CHANGES = {"iterations", "checkpoint_every", "batch_size", "world_size"}


def path_in(directory) -> Path:
    return Path(directory) / FILE_NAME


def save(directory, *, logits: torch.Tensor, optimizer: torch.optim.Optimizer, lam: torch.Tensor,
         document: dict[str, Any]) -> Path:
    tensors = {"logits": logits, "lambda": lam}
    (param,) = optimizer.param_groups[0]["params"]
    for key, value in optimizer.state.get(param, {}).items():
        tensors[f"adam.{key}"] = torch.as_tensor(value)
    # Atomic: a reader (or a resume after a kill mid-write) sees the old or the new checkpoint.
    return formats.write(path_in(directory), KIND, tensors, document)


def load(directory) -> tuple[dict[str, torch.Tensor], dict]:
    path = path_in(directory)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"TrainConfig.resume: no checkpoint at {path}; the interrupted run writes one every "
            f"checkpoint_every iterations - set resume=False to start a new run"
        )
    tensors, document = formats.read(path, KIND, loader="TrainConfig.resume")
    # Checked here, so that a damaged checkpoint is refused before any work, not by a KeyError in the loop.
    problems = [f"tensor {name!r} is missing" for name in ("logits", "lambda") if name not in tensors]
    for key, low in (("iteration", 1), ("lambda_refreshes", 0), ("updates", 0)):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{key} must be an int >= {low}, got {value!r}")
    for key, positive in (("beta", True), ("wall_time_s", False)):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
            problems.append(f"{key} must be a number {'>' if positive else '>='} 0, got {value!r}")
    if problems:
        raise formats.FileFormatError(f"TrainConfig.resume: the checkpoint {path} is damaged ({'; '.join(problems)}); "
                                      f"resume from another checkpoint_dir or start a new run (resume=False)")
    return tensors, document


def check_resumable(document: dict, expected: dict, path) -> None:
    """Raise naming every setting in which the checkpoint's run differs from the one resuming it."""
    problems = []
    saved_model, model = document.get("model", {}), expected["model"]
    for key in sorted(set(saved_model) | set(model)):
        if saved_model.get(key) != model.get(key):
            problems.append(f"model {key}: checkpoint {saved_model.get(key)!r}, now {model.get(key)!r}")
    if document.get("sampler") != expected["sampler"]:
        problems.append(f"sampler: checkpoint {document.get('sampler')!r}, now {expected['sampler']!r}")
    if document.get("global_batch") != expected["global_batch"]:
        problems.append(f"global batch (batch_size x processes): checkpoint {document.get('global_batch')}, "
                        f"now {expected['global_batch']}")
    saved_cfg, cfg = document.get("config", {}), expected["config"]
    for key in sorted(set(saved_cfg) | set(cfg)):
        if key not in _RESUMABLE_CHANGES and saved_cfg.get(key) != cfg.get(key):
            problems.append(f"{key}: checkpoint {saved_cfg.get(key)!r}, now {cfg.get(key)!r}")
    if problems:
        raise ValueError(
            f"TrainConfig.resume: the checkpoint {path} belongs to a different run ({'; '.join(problems)}); "
            f"resume with the original settings or use another checkpoint_dir"
        )


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    (param,) = optimizer.param_groups[0]["params"]
    state = {k[len("adam."):]: v.to(param.device) if k != "adam.step" else v
             for k, v in tensors.items() if k.startswith("adam.")}
    if state:
        optimizer.state[param] = state

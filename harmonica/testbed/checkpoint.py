"""Pickle-free training checkpoints of the testbed's networks: every tensor in one safetensors file,
everything else as JSON in that file's metadata, so a checkpoint is a single file, written atomically
(harmonica.formats.write_bytes: a crash leaves the previous checkpoint intact)."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..formats import write_bytes

_META_KEY = "harmonica_state"


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: str | os.PathLike) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(path, save(contiguous, metadata={_META_KEY: json.dumps(meta)}), "checkpoint")


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    return load_file(str(path)), meta


def pack_optimizer(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors, plain_state = {}, {}
    for param_id, slots in state["state"].items():
        plain_state[str(param_id)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{param_id}.{name}"] = value
            else:
                plain_state[str(param_id)][name] = value
    # A capturable optimizer (CUDA graphs) holds its learning rate as a device tensor: store the number.
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain_state}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                     prefix: str = "optim.") -> None:
    state: dict[int, dict] = {int(k): dict(v) for k, v in meta["plain_state"].items()}
    for key, value in tensors.items():
        if key.startswith(prefix):
            param_id, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prefixed(module_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module_state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

"""The one file format of harmonica: safetensors tensors plus one JSON document, no pickle.

Every file the package writes (schedules, routers, training checkpoints) is a safetensors file whose
header metadata holds one entry, ``"harmonica"``: a JSON object with ``format_version`` and ``kind``
and whatever the kind records. One writer and one reader serve every kind:

* :func:`write` is atomic and durable: the bytes go to a temporary file in the target folder, are
  fsynced, and are renamed over the target; on any failure the temporary file is removed and the old
  file (if any) is untouched. The target folder is checked before anything is written.
* :func:`read` refuses anything that is not a regular file (a FIFO would block forever), bounds the
  header size and the JSON nesting depth, and names the path in every error.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save

__all__ = ["FORMAT_VERSION", "HEADER_KEY", "FileFormatError", "check_writable", "read", "write"]

FORMAT_VERSION = 1
HEADER_KEY = "harmonica"
# A schedule or router header is a few KB; a training checkpoint's a few tens. Anything near this
# bound is not ours, and reading it whole would only waste memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32


class FileFormatError(ValueError):
    """A file that is not a readable harmonica file of the expected kind (names the path)."""


def check_writable(path, what: str = "path") -> Path:
    """Raise ValueError unless ``path`` could be written: its folder exists or can be created, is a
    folder, and is writable; ``path`` itself is not a folder. Creates nothing."""
    path = Path(os.fspath(path))
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; pass a file path, e.g. {path / 'out.safetensors'}")
    folder = path.parent
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {probe} is a file, not a folder; choose another location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission in {probe}; choose another location")
    return path


def write(path, kind: str, tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and ``document`` (JSON-serialisable) as a ``kind`` file at ``path``, atomically."""
    path = check_writable(path, f"{kind} file")
    header = {"format_version": FORMAT_VERSION, "kind": kind, **document}
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save {kind} to {path}: its metadata is not JSON-serialisable ({e})") from e
    payload = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata={HEADER_KEY: text})
    path.parent.mkdir(parents=True, exist_ok=True)
    # In the target folder, so the rename cannot cross file systems (where it would not be atomic).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return depth


def read(path, kind: str, *, loader: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, document) of a ``kind`` file, after the checks every kind shares.

    ``loader`` names the public function reading it (for the messages, e.g. "Router.load").
    """
    path = Path(os.fspath(path))

    def fail(problem: str) -> FileFormatError:
        return FileFormatError(f"cannot load {kind} from {path}: {problem}")

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot load {kind}: no file at {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise fail("not a regular file (a folder, pipe or device); pass the path of a .safetensors file")
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise fail(f"not a readable safetensors file ({info.st_size} bytes, shorter than a header; truncated?)")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > MAX_HEADER_BYTES or header_bytes + 8 > info.st_size:
        raise fail(f"not a readable safetensors file (its header claims {header_bytes} bytes in a "
                   f"{info.st_size}-byte file: truncated, or not a harmonica file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise fail(f"not a readable safetensors file ({e})") from e
    if HEADER_KEY not in metadata:
        raise fail(f"the safetensors header has no {HEADER_KEY!r} metadata entry; only files written by "
                   f"{loader.split('.')[0]}.save() can be loaded")
    try:
        document = json.loads(metadata[HEADER_KEY])
    except RecursionError:
        raise fail(f"the {HEADER_KEY!r} header entry is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise fail(f"the {HEADER_KEY!r} header entry is not valid JSON ({e})") from e
    if not isinstance(document, dict):
        raise fail(f"the {HEADER_KEY!r} header entry must be a JSON object, got {type(document).__name__}")
    if _depth(document) > MAX_JSON_DEPTH:
        raise fail(f"the {HEADER_KEY!r} header entry is nested deeper than {MAX_JSON_DEPTH} levels")
    version = document.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        hint = "upgrade harmonica to read it" if newer else "it was not written by a compatible harmonica"
        raise fail(f"format_version {version!r} is not supported (this harmonica reads {FORMAT_VERSION}); {hint}")
    found = document.get("kind")
    if found != kind:
        hint = f"; load it with {_LOADERS[found]}" if found in _LOADERS else ""
        raise fail(f"the file holds kind {found!r}, expected {kind!r}{hint}")
    return tensors, document


_LOADERS = {"schedule": "Schedule.load()", "router": "Router.load()",
            "train_checkpoint": "TrainConfig(resume=True, checkpoint_dir=...)"}

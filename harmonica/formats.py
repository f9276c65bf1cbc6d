"""The one file format of harmonica: safetensors tensors plus one JSON document, no pickle.

Every file the package writes (schedules, routers, training checkpoints) is a safetensors file whose
header metadata holds one entry, ``"harmonica"``: a JSON object with ``format_version`` and ``kind``
and whatever the kind records. One writer and one reader serve every kind:

* :func:`write` is atomic and durable: the bytes go to a temporary file in the target folder, are
  fsynced, and are renamed over the target; on any failure the temporary file is removed and the old
  file (if any) is untouched. The target folder is checked before anything is written.
* :func:`read` refuses anything that is not a regular file (a FIFO would block forever), bounds the
  header size and the JSON nesting depth, refuses NaN and infinities in the header, and names the
  path in every error. :func:`read_tensors` makes the same file checks for any safetensors file.

Other files the package writes (a training log, the command line's JSON and Markdown results) go
through :func:`write_text`, the same atomic writer. :func:`check_writable` and :func:`check_folder`
tell before any work whether an output location can be written.
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

__all__ = ["FORMAT_VERSION", "HEADER_KEY", "FileFormatError", "check_folder", "check_writable", "read",
           "read_tensors", "write", "write_text"]

FORMAT_VERSION = 1
HEADER_KEY = "harmonica"
# A schedule or router header is a few KB; a training checkpoint's a few tens. Anything near this
# bound is not ours, and reading it whole would only waste memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32
# Read once, while importing (os.umask can only be read by setting it): mkstemp creates files
# readable by their owner only, and a router or schedule must get the permissions any new file gets.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class FileFormatError(ValueError):
    """A file that is not a readable harmonica file of the expected kind (names the path)."""


def check_writable(path, what: str = "path") -> Path:
    """Raise ValueError unless a file could be written at ``path``: it is not a folder or a device,
    and its folder exists or can be created and accepts new files. Leaves nothing behind.

    Whether a file can be created is tried, not inferred from permission bits: root passes every
    ``os.access`` check, yet cannot create files in /proc or on a read-only file system.
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; pass a file path, e.g. {path / 'out.safetensors'}")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} exists and is not a regular file (a device or a pipe); "
                         f"choose a file path")
    _try_create_in(path.parent, what, path)
    return path


def check_folder(path, what: str = "folder") -> Path:
    """Raise ValueError unless ``path`` is a folder that exists or can be created, and accepts new
    files. Leaves nothing behind."""
    path = Path(os.fspath(path))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; choose a folder path")
    _try_create_in(path, what, path)
    return path


def _try_create_in(folder: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``folder``, or in its nearest existing ancestor if it is missing
    (write() creates the missing folders there)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {target} cannot be created: {probe} is a file, not a folder; "
                         f"choose another location")
    try:
        fd, name = tempfile.mkstemp(prefix=".harmonica-probe-", dir=probe)
    except OSError as e:
        raise ValueError(f"{what} {target} cannot be written: no file can be created in {probe} "
                         f"({e.strerror}); choose another location") from None
    os.close(fd)
    os.unlink(name)


def write(path, kind: str, tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and ``document`` (JSON-serialisable) as a ``kind`` file at ``path``, atomically."""
    path = check_writable(path, f"{kind} file")
    header = {"format_version": FORMAT_VERSION, "kind": kind, **document}
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save {kind} to {path}: its metadata is not JSON-serialisable ({e})") from e
    payload = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata={HEADER_KEY: text})
    return _replace(path, payload)


def write_text(path, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) at ``path`` as :func:`write` does: checked first, atomic, fsynced."""
    return write_bytes(path, text.encode(), what)


def write_bytes(path, payload: bytes, what: str = "file") -> Path:
    """Write ``payload`` at ``path`` as :func:`write` does: checked first, atomic, fsynced."""
    return _replace(check_writable(path, what), payload)


def _replace(path: Path, payload: bytes) -> Path:
    """Put ``payload`` at ``path`` so that a reader (or a crash) sees the old file or the new one, never
    a part: temporary file, fsync, rename, then fsync of the folder; the temporary file is removed on
    any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # In the target folder, so the rename cannot cross file systems (where it would not be atomic).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
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


def read_tensors(path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of any safetensors file, e.g. a user's prompt embeddings.

    Refuses anything that is not a regular file (a FIFO would block the reader forever) and headers
    larger than MAX_HEADER_BYTES or larger than the file; every error names ``what`` and the path.
    """
    path = Path(os.fspath(path))

    def fail(problem: str) -> FileFormatError:
        return FileFormatError(f"cannot load {what} from {path}: {problem}")

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot load {what}: no file at {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise fail("not a regular file (a folder, pipe or device); pass the path of a .safetensors file")
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise fail(f"not a readable safetensors file ({info.st_size} bytes, shorter than a header; truncated?)")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > MAX_HEADER_BYTES or header_bytes + 8 > info.st_size:
        raise fail(f"not a readable safetensors file (its header claims {header_bytes} bytes in a "
                   f"{info.st_size}-byte file: truncated, or not a safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise fail(f"not a readable safetensors file ({e}); truncated or corrupted?") from e
    return tensors, metadata


def _refuse_constant(name: str):
    # json.loads accepts NaN and Infinity, which write() never produces (allow_nan=False): a header
    # holding one was edited, and a NaN compares false with everything, which would skip the checks
    # made against it (a NaN cache_usage would pass any consistency test).
    raise ValueError(f"the value {name} is not allowed (harmonica writes finite numbers only)")


def read(path, kind: str, *, loader: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, document) of a ``kind`` file, after the checks every kind shares.

    ``loader`` names the public function reading it (for the messages, e.g. "Router.load").
    """
    path = Path(os.fspath(path))

    def fail(problem: str) -> FileFormatError:
        return FileFormatError(f"cannot load {kind} from {path}: {problem}")

    tensors, metadata = read_tensors(path, kind)
    if HEADER_KEY not in metadata:
        raise fail(f"the safetensors header has no {HEADER_KEY!r} metadata entry; only files written by "
                   f"{loader.split('.')[0]}.save() can be loaded")
    try:
        document = json.loads(metadata[HEADER_KEY], parse_constant=_refuse_constant)
    except RecursionError:
        raise fail(f"the {HEADER_KEY!r} header entry is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, and so is a refused NaN
        raise fail(f"the {HEADER_KEY!r} header entry is not valid JSON ({e})") from None
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

"""harmonica.formats: the one writer (atomic, fsynced, checked first) and the one reader (regular files
only, bounded header, finite numbers, the path in every error)."""

from __future__ import annotations

import json
import os
import signal
import struct
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from harmonica import formats
from harmonica.formats import FileFormatError, check_folder, check_writable, read, read_tensors, write, write_text
from harmonica.schedule import Router, Schedule


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a reader that opens a FIFO blocks until a writer appears."""

    def expired(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def header_file(path, document, tensors=None):
    """A safetensors file with ``document`` as its harmonica entry, written as-is (NaN, nesting...)."""
    text = document if isinstance(document, str) else json.dumps(document)
    save_file(tensors or {"x": torch.zeros(2)}, str(path), metadata={formats.HEADER_KEY: text})
    return path


# ---------------------------------------------------------------------------------------------- writing


def test_write_round_trips_and_leaves_only_the_file(tmp_path):
    path = write(tmp_path / "a.safetensors", "thing", {"x": torch.arange(4.0)}, {"note": "hi"})
    tensors, document = read(path, "thing", loader="Thing.load")
    assert torch.equal(tensors["x"], torch.arange(4.0))
    assert document == {"format_version": formats.FORMAT_VERSION, "kind": "thing", "note": "hi"}
    assert listing(tmp_path) == ["a.safetensors"]


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    # mkstemp makes 0600 files; renamed as they are, routers would be unreadable by anyone else.
    umask = os.umask(0o022)
    os.umask(umask)
    Schedule.fora(4, 2).save(tmp_path / "s.safetensors")
    write_text(tmp_path / "log.jsonl", "")
    (tmp_path / "plain").write_text("")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == expected
    assert (tmp_path / "log.jsonl").stat().st_mode & 0o777 == expected


def test_write_creates_missing_folders(tmp_path):
    target = tmp_path / "new" / "deeper" / "s.safetensors"
    Schedule.fora(4, 2).save(target)
    assert Schedule.load(target) == Schedule.fora(4, 2)


def test_failure_between_write_and_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.safetensors"
    old = Router.init(3, 2, generator=torch.Generator().manual_seed(0))
    old.save(path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        assert os.path.exists(src)  # the new bytes are complete on disk at this point
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        Router.init(3, 2, generator=torch.Generator().manual_seed(1)).save(path)
    assert listing(tmp_path) == ["r.safetensors"]
    assert path.read_bytes() == before


def test_an_interrupt_while_writing_removes_the_temporary(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Schedule.fora(4, 2).save(tmp_path / "s.safetensors")
    assert listing(tmp_path) == []


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(formats.os, "fsync", fsync)
    monkeypatch.setattr(formats.os, "replace", replace)
    write_text(tmp_path / "log.jsonl", "{}\n")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "log.jsonl").read_text() == "{}\n"


# ---------------------------------------------------------------------------------------------- locations


@pytest.mark.parametrize("case, match", [
    ("folder", "is a folder; pass a file path"),
    ("under-file", "is a file, not a folder"),
    ("deep-under-file", "is a file, not a folder"),
    ("device", "is not a regular file"),
    ("proc", "no file can be created in /proc"),
])
def test_check_writable_refuses_what_cannot_be_written(tmp_path, case, match):
    (tmp_path / "afile").write_text("x")
    path = {"folder": tmp_path, "under-file": tmp_path / "afile" / "r.safetensors",
            "deep-under-file": tmp_path / "afile" / "a" / "b" / "r.safetensors", "device": "/dev/null",
            "proc": "/proc/harmonica-test/r.safetensors"}[case]
    if case == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    with pytest.raises(ValueError, match=match) as info:
        check_writable(path, "--out")
    assert str(info.value).startswith("--out ")  # names the argument
    assert listing(tmp_path) == ["afile"]


def test_check_writable_accepts_new_folders_and_creates_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "r.safetensors", "--out") == tmp_path / "a" / "b" / "r.safetensors"
    (tmp_path / "old.safetensors").write_text("replaced later")
    check_writable(tmp_path / "old.safetensors", "--out")
    check_folder(tmp_path / "x" / "y", "--out")
    assert listing(tmp_path) == ["old.safetensors"]


def test_check_folder_refuses_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="--checkpoint-dir .*afile is a file, not a folder"):
        check_folder(tmp_path / "afile", "--checkpoint-dir")


def test_write_checks_the_location_first(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"schedule file .*afile/s.safetensors cannot be created"):
        Schedule.fora(4, 2).save(tmp_path / "afile" / "s.safetensors")


# ---------------------------------------------------------------------------------------------- reading


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with deadline(20):
        for load in (Schedule.load, Router.load):
            with pytest.raises(FileFormatError, match="not a regular file") as info:
                load(fifo)
            assert str(fifo) in str(info.value)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="not a regular file"):
        Schedule.load(tmp_path)


@pytest.mark.parametrize("cut", [1, 8, 40])
def test_a_truncated_file_is_refused_with_its_path(tmp_path, cut):
    path = tmp_path / "r.safetensors"
    Router.init(6, 4).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(FileFormatError, match="not a readable safetensors file") as info:
        Router.load(path)
    assert str(path) in str(info.value)


def test_a_header_larger_than_the_bound_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", formats.MAX_HEADER_BYTES + 1) + b"{" * 64)
    with pytest.raises(FileFormatError, match="header claims"):
        read_tensors(path, "schedule")


@pytest.mark.parametrize("depth", [formats.MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_headers_are_refused(tmp_path, depth):
    document = '{"format_version": 1, "kind": "schedule", "x": ' + "[" * depth + "]" * depth + "}"
    path = header_file(tmp_path / "deep.safetensors", document)
    with pytest.raises(FileFormatError, match="nested") as info:
        read(path, "schedule", loader="Schedule.load")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_a_header_are_refused(tmp_path, constant):
    document = '{"format_version": 1, "kind": "schedule", "cache_usage": ' + constant + "}"
    path = header_file(tmp_path / "nan.safetensors", document)
    with pytest.raises(FileFormatError, match=f"{constant} is not allowed"):
        read(path, "schedule", loader="Schedule.load")


def test_read_tensors_reads_any_safetensors_file(tmp_path):
    save_file({"embeds": torch.ones(2, 3, 4)}, str(tmp_path / "e.safetensors"))
    tensors, metadata = read_tensors(tmp_path / "e.safetensors", "--prompt-embeds")
    assert torch.equal(tensors["embeds"], torch.ones(2, 3, 4)) and metadata == {}
    with pytest.raises(FileNotFoundError, match="--prompt-embeds: no file at"):
        read_tensors(tmp_path / "missing.safetensors", "--prompt-embeds")

"""harmonica.timing: best-of-N interleaved timing and the allocator setting it relies on."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

from harmonica.timing import best_times

# Allocates, touches and frees a 64 MB tensor, with glibc's defaults ("default") or after
# keep_freed_memory() ("keep"), and prints the minor page faults of one more such round. 64 MB is
# above glibc's largest mmap threshold (32 MB), so by default every such allocation is fresh memory
# from the kernel and faults once per 4 KB page.
_FAULTS_OF_A_REALLOCATION = textwrap.dedent("""
    import resource, sys, torch
    from harmonica.timing import keep_freed_memory

    def touch_and_free():
        torch.ones(16 * 2**20)  # 64 MB, filled (every page touched), then freed

    touch_and_free()
    if sys.argv[1] == "keep":
        keep_freed_memory()
        for _ in range(3):  # the heap grows to hold the block (faulting once or twice), then keeps it
            touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_and_free()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(setting: str) -> int:
    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REALLOCATION, setting], capture_output=True,
                            text=True, check=True)
    return int(result.stdout.strip())


_LIBC = ctypes.util.find_library("c")


@pytest.mark.skipif(_LIBC is None or not hasattr(ctypes.CDLL(_LIBC), "mallopt"), reason="not glibc")
def test_keep_freed_memory_makes_large_reallocations_reuse_warm_pages():
    pages = 64 * 2**20 // 4096
    assert _faults("default") >= pages // 2  # glibc's default: the block comes back from the kernel, cold
    assert _faults("keep") < pages // 20  # reused: (almost) no page is faulted again


def test_best_times_interleaves_rounds_and_keeps_the_fastest():
    calls = []
    times = best_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=True)
    assert calls == ["a", "b"] * 4  # one untimed warm-up round, then three interleaved rounds
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())
    with pytest.raises(ValueError, match="repeats"):
        best_times({"a": lambda: None}, repeats=0)

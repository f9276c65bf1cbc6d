"""CPU speed of this checkout's fused ops against another revision's, in one process, interleaved.

    python benchmarks/compare_builds.py --base <git rev>        # builds the base CPU-only, then compares
    python benchmarks/compare_builds.py --base-library path/_C.so   # a base already built this way

The base revision is exported with `git archive` into build/compare-<rev>/, its op library renamed
from `harmonica` to `harmonica_base` (TORCH_LIBRARY names and schema strings) so both load side by
side, and built with HARMONICA_CUDA=0. Each op then runs on the same tensors in alternating rounds
(base, new, new, base, ...), and the result is the median over rounds of new time / base time: load
from other processes that drifts over seconds hits both sides of a ratio alike. Below 1 the new
build is faster. The tensors are the DiT-XL/2 and PixArt shapes of bench_ops.py, slot hot. Both
sides are called below autograd: only the checkout's harmonica.ops registers blend's Python autograd
kernel (about 10 us a call), which the renamed base library lacks.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"DiT-XL/2 B=2": (2, 256, 1152), "DiT-XL/2 B=16": (16, 256, 1152), "PixArt-1024 B=2": (2, 4096, 1152)}


def build_base(rev: str) -> Path:
    """The base revision's CPU-only library under the `harmonica_base` op namespace."""
    target = ROOT / "build" / f"compare-{rev}"
    library = next(iter(sorted(target.glob("harmonica/_C*.so"))), None)
    if library is not None:
        return library
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    for source in [*target.glob("csrc/*.cpp"), *target.glob("csrc/*/*.cpp"), *target.glob("csrc/*/*.cu")]:
        text = source.read_text()
        text = re.sub(r"TORCH_LIBRARY(_IMPL)?\(harmonica,", r"TORCH_LIBRARY\1(harmonica_base,", text)
        source.write_text(text.replace('"harmonica::', '"harmonica_base::'))
    env = dict(os.environ, HARMONICA_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=target, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return next(iter(sorted(target.glob("harmonica/_C*.so"))))


def calls(namespace, shape, dtype):
    import torch

    ops = getattr(torch.ops, namespace)
    B, N, D = shape
    g = torch.Generator().manual_seed(0)
    x, branch, slot, grad = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    x2 = x.clone()
    gate = torch.randn(B, D, generator=g).to(dtype)
    w = torch.rand(B, generator=g)
    index = torch.arange(0, B, 2)
    active = torch.randn(index.numel(), N, D, generator=g).to(dtype)
    return {
        "cache_write": lambda: ops.cache_write(x, gate, branch, slot),
        "cache_write_": lambda: ops.cache_write_(x2, gate, branch, slot),
        "cache_read": lambda: ops.cache_read(x, gate, slot),
        "cache_read_": lambda: ops.cache_read_(x2, gate, slot),
        "blend": lambda: ops.blend(x, gate, branch, slot, w),
        "blend_backward": lambda: ops.blend_backward(grad, gate, branch, slot, w),
        "gather_rows": lambda: ops.gather_rows(x, index),
        "gated_merge": lambda: ops.gated_merge(x, gate, active, index, slot),
        "gated_merge_": lambda: ops.gated_merge_(x2, gate, active, index, slot),
    }


def timed(fn, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def compare(rounds: int, seconds_per_side: float) -> list[dict]:
    import torch

    rows = []
    cases = [(name, torch.float32) for name in SHAPES] + [("DiT-XL/2 B=16", torch.bfloat16)]
    for name, dtype in cases:
        base, new = calls("harmonica_base", SHAPES[name], dtype), calls("harmonica", SHAPES[name], dtype)
        for op in new:
            base_fn, new_fn = base[op], new[op]
            base_fn(), new_fn()
            iterations = max(1, int(seconds_per_side / max(timed(new_fn, 1), 1e-6)))
            ratios, base_times, new_times = [], [], []
            for round_index in range(rounds):
                order = ((base_fn, base_times), (new_fn, new_times))
                for fn, times in order if round_index % 2 == 0 else order[::-1]:
                    times.append(timed(fn, iterations))
                ratios.append(new_times[-1] / base_times[-1])
            rows.append(dict(op=op, case=name, dtype=str(dtype).removeprefix("torch."),
                             base_ms=statistics.median(base_times) * 1e3, new_ms=statistics.median(new_times) * 1e3,
                             ratio=statistics.median(ratios), ratio_q1=statistics.quantiles(ratios, n=4)[0],
                             ratio_q3=statistics.quantiles(ratios, n=4)[2]))
            r = rows[-1]
            print(f"| {op} | {name} | {r['dtype']} | {r['base_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio']:.3f} "
                  f"({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}) |", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--base", help="git revision to compare against (built CPU-only under build/)")
    group.add_argument("--base-library", type=Path, help="a base _C*.so built with the harmonica_base namespace")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.05, help="time per side per round")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    library = args.base_library or build_base(args.base)

    import torch

    import harmonica.ops  # noqa: F401  (this checkout's library: torch.ops.harmonica)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.ops.load_library(str(library))
    print(f"base: {library}\nnew: {Path(harmonica.ops.__file__).parent}\nthreads: {torch.get_num_threads()}\n")
    print("| op | shape | dtype | base ms | new ms | new / base (median, quartiles) |")
    print("|---|---|---|---|---|---|")
    with torch._C._AutoDispatchBelowAutograd():
        compare(args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

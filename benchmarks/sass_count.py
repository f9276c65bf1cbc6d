"""SASS instructions per element of the fused ops' CUDA kernels, read with cuobjdump from a build.

    python benchmarks/sass_count.py                        # harmonica/_C*.so, sm_90, markdown table
    python benchmarks/sass_count.py --binary build/x.o --arch sm_90 --json sass.json --max-per-byte 2.5

No GPU needed: cuobjdump disassembles the machine code embedded in the extension (or an object
file) for one architecture. Found as $CUDA_HOME/bin/cuobjdump, on PATH, or the copy Triton's pip
package ships.

Method, per kernel: the steady-state loop is the innermost backward branch whose body stores to
global memory (the grid-stride loop over packs; blend_backward's loop over tokens); its static length, from the branch target to the branch,
is the instructions one iteration issues when it takes every path (an if/else counts both sides), plus
the length of any subroutine it calls (64-bit division is a CALL). Elements per iteration = bytes
the loop stores / (element size x tensors each element is written to), so an unrolled loop counts
right. "per element" = that length / elements per iteration. The counts are an upper bound of what
one element costs on the path the kernels take, and the number the issue's review counted (the loop
body of the bf16 kernels divided by the 8 elements of a 16-byte pack). "per byte" = that length / the
bytes the loop's global loads and stores move: what decides whether a kernel is bound by memory (an
H200 issues about 7 thread instructions per byte of HBM bandwidth), and the fair measure of the
forecast ops, whose bytes per element grow with the order (forecast_update of order 4 moves 13
tensors' worth, cache_write 4 and a gate).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (op, regex on the demangled kernel name). Both the current kernels
# (run_body<...Body<T, VEC[, write]>>) and the pre-issue-16 ones (<op>_kernel<T, VEC>) are
# recognised, so the same script measures a before/after pair.
KERNELS = [
    ("cache_write", r"GatedResidualBody<(?P<t>[\w:]+), (?P<vec>\d+), true>"),
    ("cache_read", r"GatedResidualBody<(?P<t>[\w:]+), (?P<vec>\d+), false>"),
    ("blend", r"BlendBody<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    ("gated_merge", r"GatedMergeBody<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    ("blend_backward", r"BlendBackwardBody<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    # One kernel per table size (slots = order + 1); the op's row names the order.
    ("forecast_read", r"ForecastReadBody<(?P<t>[\w:]+), (?P<vec>\d+), (?P<slots>\d+)>"),
    ("forecast_update", r"ForecastUpdateBody<(?P<t>[\w:]+), (?P<vec>\d+), (?P<slots>\d+)>"),
    # Before: one kernel served cache_write and cache_read (the slot store behind a runtime branch).
    ("cache_write/read (old)", r"gated_residual_kernel<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    ("blend (old)", r"blend_forward_kernel<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    ("gated_merge (old)", r"gated_merge_kernel<(?P<t>[\w:]+), (?P<vec>\d+)>"),
    ("blend_backward (old)", r"blend_backward_kernel<(?P<t>[\w:]+), (?P<vec>\d+)>"),
]
TYPES = {"c10::BFloat16": ("bfloat16", 2), "c10::Half": ("float16", 2), "float": ("float32", 4), "double": ("float64", 8)}
INSTRUCTION = re.compile(r"/\*(?P<address>[0-9a-f]{4,})\*/\s+(?P<text>[^;]*);")
STORE_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def find_cuobjdump() -> str:
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    if shutil.which("cuobjdump"):
        candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("sass_count: no cuobjdump found (set CUDA_HOME, or `pip install triton`, which ships one)")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return names
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Demangled kernel name -> [(address, instruction text)]."""
    mangled, bodies = [], []
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = part.partition("\n")
        mangled.append(name.strip())
        bodies.append([(int(m["address"], 16), m["text"].strip()) for m in INSTRUCTION.finditer(body)])
    return dict(zip(demangle(mangled), bodies))


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text else ""


def access_bytes(op: str, kinds: tuple[str, ...]) -> int:
    """Bytes one thread moves with a global access whose opcode starts with one of `kinds`."""
    if not op.startswith(kinds):
        return 0
    for suffix, size in STORE_BYTES.items():
        if op.endswith("." + suffix):
            return size
    return 4


def store_bytes(op: str) -> int:
    return access_bytes(op, ("STG",))


def main_loop(body: list[tuple[int, str]], pack_bytes: int) -> tuple[int, int] | None:
    """(first, last) address of the steady-state loop: an innermost loop that stores whole packs
    (blend_backward's token loop, not the task loop around it); of several such loops (nvcc may emit
    one loop per value of a runtime flag), the one with the most pack stores, the costlier path."""
    loops = []
    for address, text in body:
        if opcode(text) != "BRA":
            continue
        target = int(text.split()[-1], 16)
        stores = sum(1 for a, t in body if target <= a <= address and store_bytes(opcode(t)) == pack_bytes)
        if target < address and stores:
            loops.append((target, address, stores))
    innermost = [(first, last, stores) for first, last, stores in loops
                 if not any(first <= f and l <= last and (f, l) != (first, last) for f, l, _ in loops)]
    if not innermost:
        return None
    first, last, _ = max(innermost, key=lambda loop: (loop[2], loop[1] - loop[0]))
    return first, last


def subroutine_length(body: list[tuple[int, str]], start: int) -> int:
    length = 0
    for address, text in body:
        if address >= start:
            length += 1
            if opcode(text).startswith("RET"):
                break
    return length


def count(binary: Path, arch: str) -> list[dict]:
    sass = subprocess.run([find_cuobjdump(), "-sass", "-arch", arch, str(binary)], capture_output=True, text=True,
                          check=True).stdout
    rows = []
    for name, body in functions(sass).items():
        for op, pattern in KERNELS:
            match = re.search(pattern, name)
            if not match or match["t"] not in TYPES:
                continue
            dtype, size = TYPES[match["t"]]
            vec = int(match["vec"])
            loop = main_loop(body, vec * size)
            if loop is None:
                continue
            inside = [(a, t) for a, t in body if loop[0] <= a <= loop[1]]
            calls = sorted({int(t.split()[-1], 16) for _, t in inside if opcode(t).startswith("CALL")})
            called = sum(subroutine_length(body, target) for target in calls)
            moved = sum(access_bytes(opcode(t), ("LDG", "STG")) for _, t in inside)
            name_of_op = op if match.groupdict().get("slots") is None else f"{op} order {int(match['slots']) - 1}"
            rows.append(dict(op=name_of_op, dtype=dtype, vec=vec, loop_instructions=len(inside),
                             subroutine_instructions=called, per_element=len(inside) / vec,
                             per_element_with_calls=(len(inside) + called) / vec,
                             bytes_per_element=moved / vec, per_byte=len(inside) / moved if moved else float("nan"),
                             kernel=name))
    return sorted(rows, key=lambda r: (r["op"], r["dtype"], -r["vec"]))


def markdown(rows: list[dict], arch: str) -> str:
    lines = [f"| op | dtype | pack (elements) | loop instructions | SASS per element ({arch}) | "
             "with called subroutines | bytes per element | SASS per byte |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['dtype']} | {r['vec']} | {r['loop_instructions']} | "
                     f"{r['per_element']:.1f} | {r['per_element_with_calls']:.1f} | {r['bytes_per_element']:.1f} | "
                     f"{r['per_byte']:.2f} |")
    return "\n".join(lines)


def default_binary() -> Path:
    found = sorted(glob.glob(str(ROOT / "harmonica" / "_C*.so")))
    if not found:
        raise SystemExit("sass_count: harmonica/_C*.so not found; build with `python setup.py build_ext --inplace`")
    return Path(found[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, help="extension .so or object file (default harmonica/_C*.so)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path, help="also write the rows (and the markdown) as JSON")
    parser.add_argument("--all", action="store_true", help="every pack width and dtype, not only the widest bf16/f16/f32")
    parser.add_argument("--max", type=float, help="exit 1 if a bfloat16 16-byte-pack forward op exceeds this per element")
    parser.add_argument("--max-per-byte", type=float,
                        help="exit 1 if a bfloat16 16-byte-pack forward op exceeds this per byte its loop moves")
    args = parser.parse_args(argv)
    rows = count(args.binary or default_binary(), args.arch)
    if not rows:
        print(f"sass_count: no harmonica kernels for {args.arch} in the binary (built for another arch, or CPU only?)")
        return 1
    widest = {"bfloat16": 8, "float16": 8, "float32": 4, "float64": 2}
    shown = rows if args.all else [r for r in rows if r["vec"] == widest[r["dtype"]] and r["dtype"] != "float64"]
    table = markdown(shown, args.arch)
    print(table)
    checked = [r for r in rows if r["dtype"] == "bfloat16" and r["vec"] == 8 and "backward" not in r["op"]]
    worst = max((r["per_element"] for r in checked), default=0)
    worst_per_byte = max((r["per_byte"] for r in checked), default=0)
    summary = (f"bf16 forward ops <= {worst:.1f} SASS instructions per element, <= {worst_per_byte:.2f} per byte "
               f"moved ({args.arch})")
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(dict(arch=args.arch, rows=rows, markdown=table, summary=summary), indent=1))
    failed = False
    for bound, value, unit in ((args.max, worst, "per element"), (args.max_per_byte, worst_per_byte, "per byte")):
        if bound is not None and value > bound:
            print(f"sass_count: {value:.2f} {unit} is above the bound of {bound}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU parts of `make gpu-check` (benchmarks/gpu_check.sh runs them, each under its own timeout).

    python benchmarks/gpu_check.py ops    --out ops.json     # fused ops vs eager vs copy, CUDA events
    python benchmarks/gpu_check.py e2e    --out e2e.json     # DiT-XL/2 shape, cached vs uncached
    python benchmarks/gpu_check.py report --work DIR --report DIR   # report.md + report.json

Timing on the GPU: every measurement is the mean of a loop of calls between two CUDA events after a
warm-up, so it is the kernels' time (launches are queued ahead of them, except where a single call
is shorter than its launch, which the small shapes show). Big shapes (every tensor larger than the
H100/H200 L2) give HBM bandwidth; GB/s counts the bytes an op must move at least (each input read
once, each output written once), and `copy_` of the same tensor measured in the same run is the
yardstick.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

BENCHMARK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARK_DIR.parent))  # the checkout's harmonica, built in place

# ---------------------------------------------------------------------------------------------------
# Op benchmarks

# name -> (B, N, D). The DiT-XL/2 rows are what a cached DiT step runs; "HBM" rows are large enough
# (75 MB per bf16 tensor) that every operand comes from DRAM, which is what bandwidth means.
OP_CASES = [
    ("DiT-XL/2 B=2", (2, 256, 1152), torch.float16),
    ("DiT-XL/2 B=16", (16, 256, 1152), torch.bfloat16),
    ("PixArt-1024 B=2", (2, 4096, 1152), torch.float32),
    ("HBM B=128", (128, 256, 1152), torch.bfloat16),
    ("HBM B=64", (64, 256, 1152), torch.float32),
]


def cuda_time(fn, min_seconds: float = 0.05, max_iters: int = 200) -> float:
    """Mean seconds per call of `fn` on the GPU (CUDA events around a loop, after a warm-up)."""
    if not torch.cuda.is_available():  # --smoke on a machine without a GPU: the code path, not a timing
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    iters = int(min(max_iters, max(5, min_seconds / once)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def op_builders(shape, dtype, device):
    from bench_ops import FORECAST_COEFFS, FORECAST_INV, forecast_update_eager, forecast_value_eager

    from harmonica import ops

    B, N, D = shape
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size, dt=dtype):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dt)

    x, branch, slot, grad = rand(B, N, D), rand(B, N, D), rand(B, N, D), rand(B, N, D)
    gate = rand(B, D)
    g3 = gate.unsqueeze(1)
    w = torch.rand(B, generator=g, device=device)
    w3 = w.to(dtype).view(B, 1, 1)
    index = torch.arange(0, B, 2, device=device)
    active = rand(index.numel(), N, D)
    x2 = x.clone()
    table = [rand(B, N, D) for _ in range(3)]  # a forecast table of orders 0..2
    elem = x.element_size()
    n = x.numel()
    nbytes = n * elem
    gate_bytes = gate.numel() * elem

    def eager_merge():
        out = x + g3 * slot
        out[index] = x[index] + g3[index] * active
        slot[index] = active
        return out

    return {
        # op: (fused, eager, minimum bytes moved)
        "cache_write": (lambda: ops.cache_write(x, gate, branch, slot),
                        lambda: (x + g3 * branch, slot.copy_(branch)), 4 * nbytes + gate_bytes),
        "cache_write_": (lambda: ops.cache_write_(x2, gate, branch, slot),
                         lambda: (x2.add_(g3 * branch), slot.copy_(branch)), 4 * nbytes + gate_bytes),
        "cache_read": (lambda: ops.cache_read(x, gate, slot), lambda: x + g3 * slot, 3 * nbytes + gate_bytes),
        "cache_read_": (lambda: ops.cache_read_(x2, gate, slot), lambda: x2.add_(g3 * slot),
                        3 * nbytes + gate_bytes),
        "blend": (lambda: ops.blend(x, gate, branch, slot, w), lambda: x + g3 * (w3 * branch + (1 - w3) * slot),
                  4 * nbytes + gate_bytes),
        "blend_backward": (lambda: torch.ops.harmonica.blend_backward(grad, gate, branch, slot, w),
                           lambda: (grad * g3 * w3, (grad * (w3 * branch + (1 - w3) * slot)).sum(1),
                                    (grad * g3 * (branch - slot)).sum((1, 2))),
                           4 * nbytes + 2 * gate_bytes),
        "gather_rows": (lambda: ops.gather_rows(x, index), lambda: x[index], 2 * index.numel() * N * D * elem),
        "gated_merge": (lambda: ops.gated_merge(x, gate, active, index, slot), eager_merge,
                        3 * nbytes + 2 * active.numel() * elem + gate_bytes),
        "copy_": (lambda: slot.copy_(branch), None, 2 * nbytes),
        # What cached inference runs when a schedule forecasts (orders 1 and 2, in place).
        **{f"forecast_read_ o{m}": (
            lambda m=m: ops.forecast_read_(x2, gate, table[: m + 1], FORECAST_COEFFS[: m + 1]),
            lambda m=m: x2.add_(g3 * forecast_value_eager(table[: m + 1], FORECAST_COEFFS[: m + 1])),
            (m + 3) * nbytes + gate_bytes) for m in (1, 2)},
        **{f"forecast_update_ o{m}": (
            lambda m=m: ops.forecast_update_(x2, gate, branch, table[: m + 1], FORECAST_INV[:m]),
            lambda m=m: (x2.add_(g3 * branch), forecast_update_eager(branch, table[: m + 1], FORECAST_INV[:m])),
            (2 * m + 4) * nbytes + gate_bytes) for m in (1, 2)},
    }


def run_ops(out_path: Path, smoke: bool = False) -> dict:
    device = _device()
    rows = []
    cases = [(name, (2, 8, 64), dtype) for name, _, dtype in OP_CASES] if smoke else OP_CASES
    for name, shape, dtype in cases:
        builders = op_builders(shape, dtype, device)
        copy_s = cuda_time(builders["copy_"][0])
        for op, (fused, eager, nbytes) in builders.items():
            if eager is None:
                continue
            fused_s = cuda_time(fused)
            eager_s = cuda_time(eager)
            rows.append(dict(op=op, case=name, shape=list(shape), dtype=str(dtype).removeprefix("torch."),
                             fused_us=fused_s * 1e6, eager_us=eager_s * 1e6, speedup=eager_s / fused_s,
                             fused_gbs=nbytes / fused_s / 1e9, copy_gbs=2 * math.prod(shape) *
                             torch.empty((), dtype=dtype).element_size() / copy_s / 1e9))
            print(f"{op:15s} {name:16s} {rows[-1]['dtype']:9s} fused {rows[-1]['fused_us']:9.1f} us  eager "
                  f"{rows[-1]['eager_us']:9.1f} us  {rows[-1]['speedup']:5.2f}x  {rows[-1]['fused_gbs']:7.0f} GB/s "
                  f"(copy {rows[-1]['copy_gbs']:5.0f})", flush=True)
        del builders
        torch.cuda.empty_cache()
    result = dict(device=_device_name(), rows=rows)
    out_path.write_text(json.dumps(result, indent=1))
    return result


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run, not a measurement)"


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# End to end: DiT-XL/2 shape, cached vs uncached, eager and CUDA graphs

E2E_STEPS = 20
GUIDANCE = 1.5


def _best_of(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best


class GraphedSampler:
    """DDIM sampling whose model calls are replayed CUDA graphs, one graph per schedule step.

    Uncached, one graph serves every step (the timestep is an input buffer). Cached, step t's graph
    holds step t's plan (which branches compute, store, or read which slot), so the steps are captured
    in order, in one memory pool, while the cache state advances exactly as in a sampling run: slots
    allocated during the capture of step t are the ones step t+1's graph reads.
    """

    def __init__(self, model, schedule, labels, steps):
        from diffusers import DDIMScheduler

        import harmonica as hc

        self.model, self.steps = model, steps
        batch = 2 * labels.numel()
        device, dtype = labels.device, next(model.parameters()).dtype
        channels, size = model.config.in_channels, model.config.sample_size
        self.class_labels = torch.cat([labels, torch.full_like(labels, 1000)])
        self.x_in = torch.zeros(batch, channels, size, size, device=device, dtype=dtype)
        self.t_in = torch.zeros(batch, device=device, dtype=torch.long)
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.outputs = [], []
        if schedule is None:
            self._capture(pool)
            return
        # The cache state follows a scheduler, as in a sampling run: set_timesteps begins the run and
        # step ends a step (its arithmetic on the captured, not yet computed, outputs is discarded).
        state = hc.enable_cache(model, schedule)
        driver = DDIMScheduler()
        try:
            with torch.no_grad(), state.driven_by(driver):
                driver.set_timesteps(steps, device=device)
                for t in driver.timesteps:
                    self._capture(pool)
                    driver.step(self.outputs[-1][:, :channels], t, self.x_in)
        finally:
            hc.disable_cache(model)  # the graphs keep what they captured; the model is eager again

    def _call(self):
        return self.model(self.x_in, timestep=self.t_in, class_labels=self.class_labels, return_dict=False)[0]

    def _capture(self, pool):
        # The caller ran the same forwards eagerly first (cuBLAS handles, kernel choices), which is
        # the warm-up a capture needs.
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            out = self._call()
        self.graphs.append(graph)
        self.outputs.append(out)

    def __call__(self, latents, scheduler):
        scheduler.set_timesteps(self.steps, device=latents.device)
        x = latents * scheduler.init_noise_sigma
        half = latents.shape[0]
        for step, t in enumerate(scheduler.timesteps):
            self.x_in.copy_(torch.cat([x, x]))
            self.t_in.copy_(t.expand_as(self.t_in))
            index = step if len(self.graphs) > 1 else 0
            self.graphs[index].replay()
            out = self.outputs[index][:, : latents.shape[1]]
            eps_cond, eps_uncond = out[:half], out[half:]
            eps = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x


def run_e2e(out_path: Path, smoke: bool = False) -> dict:
    """`smoke`: a 2-block model, 3 steps, one round, float32: checks the code path on any machine."""
    from diffusers import DDIMScheduler

    import harmonica as hc
    from harmonica.sampling import sample
    from harmonica.timing import DIT_SHAPES, cached, random_dit

    device = _device()
    blocks, steps, batches, rounds = (2, 3, (1,), 1) if smoke else (DIT_SHAPES["dit-xl"]["num_layers"], E2E_STEPS, (1, 8), 3)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = random_dit("dit-xl", device=device, num_layers=blocks).to(dtype)
    schedules = {"FORA interval 2": hc.Schedule.fora(steps, blocks, interval=2),
                 "Delta-DiT": hc.Schedule.delta_dit(steps, blocks),
                 # forecast_update_ / forecast_read_ on every skipped step: the issue's >= 0.95 bar
                 "TaylorSeer interval 2 order 2": hc.Schedule.taylorseer(steps, blocks, interval=2, order=2)}
    rows = []
    for images in batches:
        labels = torch.arange(images, device=device) * 7 % 1000
        latents = torch.randn(images, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)

        def eager(schedule):
            with cached(model, schedule):
                return sample(model, DDIMScheduler(), latents, num_inference_steps=steps,
                              cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, 1000)},
                              guidance_scale=GUIDANCE, progress=False)

        eager(None)  # warm-up: cuBLAS/SDPA handles and kernels, before any capture
        uncached_eager = _best_of(lambda: eager(None), rounds)
        reference_uncached = eager(None)
        uncached_graph_sampler = graph_uncached_out = None
        uncached_graph_error = "no CUDA device" if device.type != "cuda" else None
        if uncached_graph_error is None:
            try:
                uncached_graph_sampler = GraphedSampler(model, None, labels, steps)
                uncached_graph = _best_of(lambda: uncached_graph_sampler(latents, DDIMScheduler()), rounds)
                graph_uncached_out = uncached_graph_sampler(latents, DDIMScheduler())
            except Exception as error:  # the report must say why, and the eager rows still run
                uncached_graph_error = f"uncached: {type(error).__name__}: {error}"[:600]
        for schedule_name, schedule in schedules.items():
            eager(schedule)
            cached_eager = _best_of(lambda: eager(schedule), rounds)
            row = dict(images=images, transformer_batch=2 * images, dtype=str(dtype).removeprefix("torch."),
                       steps=steps, blocks=blocks,
                       schedule=schedule_name, cache_usage=schedule.cache_usage,
                       theoretical_speedup=schedule.theoretical_speedup(hc.model_cost(model, batch=2 * images)),
                       uncached_eager_ms=uncached_eager * 1e3, cached_eager_ms=cached_eager * 1e3,
                       eager_speedup=uncached_eager / cached_eager)
            if uncached_graph_error is not None:
                row.update(graph_error=uncached_graph_error)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            try:
                sampler = GraphedSampler(model, schedule, labels, steps)
                cached_graph = _best_of(lambda: sampler(latents, DDIMScheduler()), rounds)
                eager_out = eager(schedule)
                graph_out = sampler(latents, DDIMScheduler())
                row.update(uncached_graph_ms=uncached_graph * 1e3, cached_graph_ms=cached_graph * 1e3,
                           graph_speedup=uncached_graph / cached_graph,
                           graph_vs_eager_max_abs_diff=float((graph_out - eager_out).abs().max()),
                           uncached_graph_vs_eager_max_abs_diff=float(
                               (graph_uncached_out - reference_uncached).abs().max()))
                sampler = None  # frees its graph before the next row
            except Exception as error:  # the report must say why, and the other rows still run
                row.update(graph_error=f"{type(error).__name__}: {error}"[:600])
            rows.append(row)
            print(json.dumps(row), flush=True)
        uncached_graph_sampler = None
        torch.cuda.empty_cache()
    result = dict(device=_device_name(), rows=rows)
    out_path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------
# Report


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests_summary(xml_path: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    cuda_cases = [case for case in root.iter("testcase") if "cuda" in (case.get("name") or "").lower()
                  and "simulated" not in (case.get("name") or "")]
    totals.update(passed=totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"],
                  failed_cases=failed[:50], cuda_named_cases=len(cuda_cases),
                  cuda_named_skipped=sum(case.find("skipped") is not None for case in cuda_cases))
    return totals


def write_report(work: Path, report: Path) -> str:
    stages = []
    stages_file = work / "stages.tsv"
    if stages_file.exists():
        for line in stages_file.read_text().splitlines():
            name, status, seconds = line.split("\t")
            stages.append(dict(stage=name, status=status, seconds=int(seconds)))
    env = _read_json(work / "env.json") or {}
    if (work / "build_line.txt").exists():
        env["build"] = (work / "build_line.txt").read_text().strip()
    if (work / "warnings.txt").exists() and (work / "warnings.txt").read_text().strip():
        env["build warnings"] = (work / "warnings.txt").read_text().strip()
    ops_result = _read_json(work / "ops.json")
    e2e_result = _read_json(work / "e2e.json")
    sass_result = _read_json(work / "sass.json")
    tests = _tests_summary(report / "tests.xml")
    compiled = _tests_summary(report / "compile.xml")
    data = dict(env=env, stages=stages, tests=tests, compile=compiled, sass=sass_result, ops=ops_result,
                e2e=e2e_result)
    (report / "report.json").write_text(json.dumps(data, indent=1))

    md = ["# harmonica gpu-check", ""]
    md += [f"* {key}: {value}" for key, value in env.items()]
    md += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
    if tests:
        md += ["", "## Tests", "",
               f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
               f"of {tests['tests']} (test cases with 'cuda' in their id, simulations excluded: "
               f"{tests['cuda_named_cases']}, of which skipped: {tests['cuda_named_skipped']})."]
        md += [f"* FAILED {case}" for case in tests["failed_cases"]]
    if compiled:
        md += ["", "## torch.compile(mode=\"reduce-overhead\") of cached sampling", "",
               f"{compiled['passed']} passed, {compiled['failures'] + compiled['errors']} failed, "
               f"{compiled['skipped']} skipped (tests/test_cuda_graphs.py; details in tests.log)."]
        md += [f"* FAILED {case}" for case in compiled["failed_cases"]]
    if sass_result:
        md += ["", "## SASS per element (cuobjdump of this build)", "", sass_result.get("markdown", "")]
    if ops_result:
        md += ["", f"## Ops ({ops_result['device']})", "",
               "| op | case | dtype | fused us | eager us | speedup | fused GB/s | copy GB/s | fused/copy |",
               "|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['op']} | {r['case']} | {r['dtype']} | {r['fused_us']:.1f} | {r['eager_us']:.1f} | "
               f"{r['speedup']:.2f}x | {r['fused_gbs']:.0f} | {r['copy_gbs']:.0f} | {r['fused_gbs'] / r['copy_gbs']:.2f} |"
               for r in ops_result["rows"]]
    if e2e_result:
        first = e2e_result["rows"][0] if e2e_result["rows"] else {}
        md += ["", f"## End to end: DiT-XL/2 shape ({first.get('blocks')} blocks), DDIM {first.get('steps')} steps, CFG, "
               f"{first.get('dtype')} ({e2e_result['device']})", "",
               "| images | schedule | CUR | theoretical | uncached eager ms | cached eager ms | eager speedup | "
               "uncached graph ms | cached graph ms | graph speedup | graph vs eager max diff |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e_result["rows"]:
            graph = (f"{r['uncached_graph_ms']:.1f} | {r['cached_graph_ms']:.1f} | {r['graph_speedup']:.2f}x | "
                     f"{r['graph_vs_eager_max_abs_diff']:.3g}" if "graph_speedup" in r
                     else f"- | - | - | {r.get('graph_error', '')}")
            md.append(f"| {r['images']} | {r['schedule']} | {r['cache_usage']:.0%} | {r['theoretical_speedup']:.2f}x | "
                      f"{r['uncached_eager_ms']:.1f} | {r['cached_eager_ms']:.1f} | {r['eager_speedup']:.2f}x | {graph} |")
    text = "\n".join(md) + "\n"
    (report / "report.md").write_text(text)

    summary = ["", "gpu-check summary", "-----------------"]
    summary += [f"{s['stage']:>8s}: {s['status']:<10s} {s['seconds']:4d} s" for s in stages]
    for name, result in (("tests", tests), ("compile", compiled)):
        if result:
            summary.append(f"{name:>8s}: {result['passed']} passed, {result['failures'] + result['errors']} failed, "
                           f"{result['skipped']} skipped" + "".join(f"\n          FAILED {c}" for c in result["failed_cases"][:8]))
    if sass_result and sass_result.get("summary"):
        summary.append(f"    sass: {sass_result['summary']}")
    if ops_result:
        rows = [r for r in ops_result["rows"] if r["case"].startswith("HBM")]
        if rows:
            worst = min(rows, key=lambda r: r["fused_gbs"] / r["copy_gbs"])
            summary.append(f"     ops: HBM rows fused/copy bandwidth >= {worst['fused_gbs'] / worst['copy_gbs']:.2f} "
                           f"(lowest: {worst['op']} {worst['dtype']})")
    if e2e_result:
        for r in e2e_result["rows"]:
            graph = (f"graphs {r['graph_speedup']:.2f}x" if "graph_speedup" in r
                     else "graphs n/a (no GPU)" if r.get("graph_error") == "no CUDA device" else "graphs FAILED")
            summary.append(f"     e2e: {r['images']} img {r['schedule']}: eager {r['eager_speedup']:.2f}x, {graph} "
                           f"(theoretical {r['theoretical_speedup']:.2f}x)")
    summary.append(f"  report: {report / 'report.md'}")
    return "\n".join(summary)


def environment() -> dict:
    import harmonica._C as C

    capability = "%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return dict(device=_device_name(), capability=capability, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                built_with_cuda=bool(C.built_with_cuda))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["env", "ops", "e2e", "report"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the code path, time nothing")
    args = parser.parse_args(argv)
    if args.what == "env":
        args.out.write_text(json.dumps(environment(), indent=1))
    elif args.what == "ops":
        run_ops(args.out, smoke=args.smoke)
    elif args.what == "e2e":
        run_e2e(args.out, smoke=args.smoke)
    else:
        print(write_report(args.work, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

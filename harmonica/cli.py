"""The ``harmonica`` command line: demo | train | sample | evaluate | plot | bench.

Exit codes: 0 success, 1 the job failed, 2 bad command line or input (missing file, a schedule for
another model, an unknown scheduler...). Errors are one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("harmonica")


class UsageError(Exception):
    """Bad input from the command line: exit code 2, one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------- helpers
def _load_plan(path: str):
    """A Router or a Schedule from a .safetensors file, whichever the file holds."""
    from .schedule import Router, Schedule

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"schedule/router file not found: {path}")
    errors = []
    for cls in (Router, Schedule):
        try:
            return cls.load(p)
        except ValueError as e:
            errors.append(str(e))
    raise UsageError(f"{path} is neither a harmonica router nor a schedule ({errors[-1]})")


def _schedule_from(path: str, threshold: float | None):
    from .schedule import Router

    plan = _load_plan(path)
    if isinstance(plan, Router):
        return plan.to_schedule(threshold)
    return plan


def _bundled_router(method: str, sampler: str, steps: int):
    from .testbed import load_router

    return load_router(method, sampler, steps)


def _testbed_runs(bed, schedule, labels, args):
    """Uncached and cached samples of the testbed from the same noise, with their best wall times."""
    from . import testbed
    from .timing import best_times, cached_copy

    kwargs = dict(seed=args.seed, num_inference_steps=schedule.num_steps, guidance_scale=args.guidance,
                  sampler=args.scheduler, progress=not args.quiet)
    models = {"uncached": bed.transformer, "cached": cached_copy(bed.transformer, schedule)}
    images = {}

    def run(name):
        images[name] = testbed.generate(bed, labels, transformer=models[name], **kwargs)

    # No separate warm-up: the first round warms the allocator and thread pool, and the best round counts.
    times = best_times({name: (lambda name=name: run(name)) for name in models}, repeats=args.rounds, warmup=False)
    return images["uncached"], images["cached"], times["uncached"], times["cached"]


# ----------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from . import evaluate, testbed
    from .apply import model_cost
    from .viz import plot_schedule, save_image_grid

    out = Path(args.out)
    bed = testbed.load()
    if args.train:
        from .testbed.routers import train

        log.info("training a HarmoniCa router on the testbed (%d trajectories)", args.iterations)
        router = train("harmonica", sampler=args.scheduler, steps=args.steps, iterations=args.iterations,
                       target_speedup=args.target_speedup, seed=args.seed, out=out / "router.safetensors")
    else:
        router = _bundled_router("harmonica", args.scheduler, args.steps)
    schedule = router.to_schedule()
    labels = torch_arange_labels(args.num_images, len(bed.class_names))
    log.info("sampling %d images with and without the cache (%s, %d steps, guidance %.1f)",
             args.num_images, args.scheduler, args.steps, args.guidance)
    uncached, cached, t_uncached, t_cached = _testbed_runs(bed, schedule, labels, args)
    cost = model_cost(bed.transformer, batch=2 * min(args.num_images, 250))
    summary = {
        "images": args.num_images,
        "cache_usage": schedule.cache_usage,
        "theoretical_speedup": schedule.theoretical_speedup(cost),
        "measured_speedup": t_uncached / t_cached,
        "uncached_seconds": t_uncached,
        "cached_seconds": t_cached,
        "psnr_vs_uncached_db": float(evaluate.psnr(cached, uncached).mean()),
        "ssim_vs_uncached": float(evaluate.ssim(cached, uncached).mean()),
        "accuracy_uncached": evaluate.classifier_accuracy(uncached, labels),
        "accuracy_cached": evaluate.classifier_accuracy(cached, labels),
    }
    out.mkdir(parents=True, exist_ok=True)
    n_show = min(10, args.num_images)
    save_image_grid([uncached[:n_show], cached[:n_show]], out / "samples.png", row_labels=["uncached", "cached"],
                    column_labels=[bed.class_names[int(y)] for y in labels[:n_show]],
                    title=f"same noise, {args.steps} {args.scheduler} steps; cached: CUR {schedule.cache_usage:.0%}, "
                          f"{summary['measured_speedup']:.2f}x faster")
    plot_schedule(router, out / "schedule.png",
                  title=f"HarmoniCa router, testbed DiT, {args.scheduler} {args.steps} steps")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"cache usage {summary['cache_usage']:.1%} | speedup {summary['measured_speedup']:.2f}x measured, "
          f"{summary['theoretical_speedup']:.2f}x theoretical | PSNR {summary['psnr_vs_uncached_db']:.1f} dB, "
          f"SSIM {summary['ssim_vs_uncached']:.3f} vs uncached | classifier accuracy "
          f"{summary['accuracy_uncached']:.1%} uncached, {summary['accuracy_cached']:.1%} cached")
    print(f"wrote {out / 'samples.png'}, {out / 'schedule.png'}, {out / 'summary.json'}")
    return 0


def torch_arange_labels(n: int, num_classes: int):
    import torch

    return torch.arange(n) % num_classes


def cmd_plot(args) -> int:
    from .viz import plot_schedule

    plan = _load_plan(args.schedule)
    path = plot_schedule(plan, args.out, threshold=args.threshold, title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_sample(args) -> int:
    from . import testbed
    from .viz import save_image_grid

    if args.model != "testbed":
        raise UsageError("sample currently runs the bundled testbed (--model testbed); for a diffusers "
                         "pipeline use harmonica.enable_cache(pipe, schedule) from Python (see README)")
    bed = testbed.load()
    if args.schedule:
        schedule = _schedule_from(args.schedule, args.threshold)
    else:
        router = _bundled_router("harmonica", args.scheduler, args.steps or 20)
        schedule = router.to_schedule()
    schedule.check_compatible(num_steps=args.steps or schedule.num_steps,
                              num_blocks=len(bed.transformer.transformer_blocks))
    labels = torch_arange_labels(args.num_images, len(bed.class_names))
    _, cached, t_uncached, t_cached = _testbed_runs(bed, schedule, labels, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid([cached[i:i + 10] for i in range(0, len(cached), 10)], out / "samples.png",
                    title=f"cached samples, CUR {schedule.cache_usage:.0%}")
    print(f"{args.num_images} images in {t_cached:.2f} s cached vs {t_uncached:.2f} s uncached "
          f"({t_uncached / t_cached:.2f}x); wrote {out / 'samples.png'}")
    return 0


def cmd_evaluate(args) -> int:
    if "--frontier" in args.compare_args:  # the quality-vs-speed frontier (harmonica.frontier)
        from .frontier import main as frontier_main

        frontier_main([a for a in args.compare_args if a != "--frontier"])
        return 0
    from .compare import main as compare_main

    compare_main(args.compare_args)
    return 0


def cmd_bench(args) -> int:
    import torch
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from .apply import model_cost
    from .sampling import sample
    from .schedule import Schedule
    from .timing import cached_copy, measure

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {"dit-xl": (28, 16, 72, 32), "dit-b": (12, 12, 64, 32)}  # (blocks, heads, head dim, latent size)
    if args.shape == "testbed":
        from . import testbed

        model = testbed.load().transformer
    else:
        layers, heads, head_dim, size = shapes[args.shape]
        torch.manual_seed(0)
        model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                      out_channels=8, num_layers=layers, sample_size=size, patch_size=2,
                                      num_embeds_ada_norm=1000).eval().requires_grad_(False)
    blocks = len(model.transformer_blocks)
    schedule = _schedule_from(args.schedule, args.threshold) if args.schedule else Schedule.fora(args.steps, blocks, 2)
    schedule.check_compatible(num_blocks=blocks, num_steps=args.steps)
    size, channels = model.config.sample_size, model.config.in_channels
    latents = torch.randn(args.batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(args.batch, dtype=torch.long)
    null = model.transformer_blocks[0].norm1.emb.class_embedder.num_classes

    models = {"uncached": model, "cached": cached_copy(model, schedule)}

    def run(name):
        sample(models[name], DDIMScheduler(), latents, num_inference_steps=args.steps, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, null)}, guidance_scale=1.5, progress=False)

    # A plain process, as a user's: no allocator tuning; the cached copy keeps its slots warm.
    timings = measure({name: (lambda name=name: run(name)) for name in models}, repeats=args.rounds)
    t_uncached, t_cached = timings["uncached"].seconds, timings["cached"].seconds
    theoretical = schedule.theoretical_speedup(model_cost(model, batch=2 * args.batch))
    measured = t_uncached / t_cached
    result = {"shape": args.shape, "blocks": blocks, "batch": args.batch, "steps": args.steps,
              "cache_usage": schedule.cache_usage, "uncached_s": t_uncached, "cached_s": t_cached,
              "measured_speedup": measured, "theoretical_speedup": theoretical,
              "measured_over_theoretical": measured / theoretical, "threads": torch.get_num_threads(),
              "page_faults_uncached": timings["uncached"].page_faults,
              "page_faults_cached": timings["cached"].page_faults}
    print(f"{args.shape}: {blocks} blocks, batch {args.batch} (x2 CFG), {args.steps} steps, CUR "
          f"{schedule.cache_usage:.1%}: uncached {t_uncached:.3f} s, cached {t_cached:.3f} s -> "
          f"{measured:.2f}x measured, {theoretical:.2f}x theoretical ({measured / theoretical:.1%}); "
          f"page faults per run {result['page_faults_uncached']} uncached, {result['page_faults_cached']} cached")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _load_diffusers_model(spec: str):
    """(transformer, scheduler config) from a local diffusers pipeline or transformer directory."""
    import diffusers

    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--model {spec!r}: no such directory; this machine has no model hub access, "
                         f"so give a local diffusers pipeline or transformer folder (or 'testbed')")
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        transformer = getattr(pipe, "transformer", None)
        if transformer is None:
            raise UsageError(f"--model {spec!r}: the pipeline has no transformer (not a DiT-style model)")
        return transformer.eval().requires_grad_(False), dict(pipe.scheduler.config)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"--model {spec!r}: neither model_index.json nor config.json found")
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise UsageError(f"--model {spec!r}: unknown model class {class_name!r}")
    transformer = cls.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False).eval().requires_grad_(False)
    scheduler_dir = path.parent / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise UsageError(f"--model {spec!r}: put the training noise schedule in {scheduler_dir}/scheduler_config.json")
    return transformer, json.loads((scheduler_dir / "scheduler_config.json").read_text())


def cmd_train(args) -> int:
    if args.model == "testbed":
        from .testbed.routers import train

        train(args.method, sampler=args.scheduler, steps=args.steps, iterations=args.iterations,
              batch_size=args.batch_size, target_speedup=args.target_speedup, seed=args.seed, out=args.out,
              checkpoint_dir=args.checkpoint_dir, resume=args.resume, log_file=args.log_file)
        print(f"wrote {args.out}")
        return 0

    from safetensors.torch import load_file

    from .sampling import make_scheduler
    from .train import ClassConditioning, PromptConditioning, TrainConfig, train_router

    transformer, scheduler_config = _load_diffusers_model(args.model)
    if args.method == "l2c":
        raise UsageError("--method l2c needs real training latents; from the command line it runs on the "
                         "testbed only (from Python pass TrainConfig(l2c_latents=...))")
    if args.prompt_embeds:
        tensors = load_file(args.prompt_embeds)
        if "embeds" not in tensors:
            raise UsageError(f"--prompt-embeds {args.prompt_embeds}: expected tensors 'embeds' (N, S, D) and "
                             f"optionally 'mask', 'negative_embeds', 'negative_mask'")
        conditioning = PromptConditioning(**{k: tensors.get(k) for k in
                                             ("embeds", "mask", "negative_embeds", "negative_mask")})
    elif getattr(transformer.config, "num_embeds_ada_norm", None) and "DiT" in type(transformer).__name__:
        classes = transformer.config.num_embeds_ada_norm
        conditioning = ClassConditioning(num_classes=classes, null_class=classes)
    else:
        raise UsageError(f"{type(transformer).__name__} is text-conditioned: pass --prompt-embeds FILE with "
                         f"text-encoder outputs (safetensors: embeds, mask, negative_embeds, negative_mask)")
    config = TrainConfig(method=args.method, num_steps=args.steps, conditioning=conditioning,
                         guidance_scale=args.guidance, batch_size=args.batch_size, iterations=args.iterations,
                         target_speedup=args.target_speedup, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                         checkpoint_every=5 if args.checkpoint_dir else 0, resume=args.resume,
                         log_file=args.log_file, progress=not args.quiet)
    router = train_router(transformer, make_scheduler(args.scheduler, scheduler_config), config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    router.save(args.out)
    print(f"wrote {args.out}: CUR {router.metadata.get('achieved_cur', float('nan')):.1%}, theoretical "
          f"speedup {router.metadata.get('theoretical_speedup', float('nan')):.2f}x")
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .sampling import SCHEDULERS
    from .testbed import DEFAULT_GUIDANCE

    parser = _Parser(prog="harmonica", description="Learned feature caching for Diffusion Transformers.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, **kwargs):
        return subparsers.add_parser(name, parents=[common], **kwargs)

    def common_sampling(p, steps=20):
        p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="diffusers sampler (default ddim)")
        p.add_argument("--steps", type=int, default=steps,
                       help="model evaluations per image (default: %s)" % (steps or "the schedule's"))
        p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                       help="classifier-free guidance scale (default: the testbed's, %(default)s)")
        p.add_argument("--seed", type=int, default=0)

    p = command("demo", help="cached vs uncached sampling of the bundled testbed DiT, with plots")
    common_sampling(p)
    p.add_argument("--num-images", type=int, default=200, help="images per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved timing rounds, the first one warms up, best kept (default %(default)s)")
    p.add_argument("--out", default="outputs/demo", help="folder for samples.png, schedule.png, summary.json")
    p.add_argument("--train", action="store_true", help="train the router instead of loading the bundled one")
    p.add_argument("--iterations", type=int, default=40, help="training trajectories with --train")
    p.add_argument("--target-speedup", type=float, default=None, help="target theoretical speedup with --train")
    p.set_defaults(func=cmd_demo)

    p = command("train", help="train a router (HarmoniCa or L2C); multi-process under torchrun")
    common_sampling(p)
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default) or a local diffusers pipeline / transformer folder")
    p.add_argument("--prompt-embeds", default=None,
                   help="PixArt: safetensors with text-encoder outputs (embeds, mask, negative_embeds, negative_mask)")
    p.add_argument("--method", default="harmonica", choices=("harmonica", "l2c"))
    p.add_argument("--iterations", type=int, default=80, help="HarmoniCa: trajectories; L2C: updates")
    p.add_argument("--batch-size", type=int, default=8, help="samples per process per iteration")
    p.add_argument("--target-speedup", type=float, default=None, help="theoretical speedup to aim at")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--log-file", default=None)
    p.add_argument("--out", required=True, help="router file to write (.safetensors)")
    p.set_defaults(func=cmd_train)

    p = command("sample", help="sample the testbed with a router/schedule applied; prints timing")
    common_sampling(p, steps=None)
    p.add_argument("--model", default="testbed")
    p.add_argument("--schedule", help="router or schedule .safetensors (default: the bundled HarmoniCa router)")
    p.add_argument("--threshold", type=float, default=None, help="router threshold (default: its own)")
    p.add_argument("--num-images", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved timing rounds, the first one warms up, best kept (default %(default)s)")
    p.add_argument("--out", default="outputs/sample")
    p.set_defaults(func=cmd_sample)

    # Listed for --help only: main() hands everything after `evaluate` to harmonica.compare unparsed.
    subparsers.add_parser("evaluate", help="comparison table (FID, accuracy, PSNR, CUR, speedups); "
                          "options: harmonica evaluate --help; --frontier: quality vs speed of every method "
                          "(harmonica evaluate --frontier --help)")

    p = command("plot", help="heatmap PNG of a router or schedule")
    p.add_argument("schedule", help="router or schedule .safetensors")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)

    p = command("bench", help="end-to-end sampling latency with and without the cache")
    p.add_argument("--shape", default="dit-xl", choices=("dit-xl", "dit-b", "testbed"))
    p.add_argument("--schedule", help="router or schedule file (default: FORA interval 2)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="images per batch (the transformer sees 2x with CFG)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, best kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:
        rest = [a for a in argv[1:] if a != "--debug"]
        args = argparse.Namespace(func=cmd_evaluate, compare_args=rest, quiet=False, debug="--debug" in argv)
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="harmonica: %(message)s")
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError, TypeError) as e:
        if args.debug:
            raise
        print(f"harmonica: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line and a non-zero exit
        if args.debug:
            raise
        print(f"harmonica: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

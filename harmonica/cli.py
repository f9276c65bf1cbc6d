"""The ``harmonica`` command line: demo | train | sample | evaluate | plot | bench.

Every command runs in two phases. First its ``check``: every argument's value, every input file, the
model's structure (its config.json, built on the meta device: no weights are read) and every output
location (tried, not guessed). A problem there is bad input: one line on stderr naming the argument
and the fix, exit code 2, and nothing was loaded, trained or written. Then the work; a failure there
is exit code 1. ``--debug`` shows tracebacks. Every option either acts or is refused: an option that
does nothing in the given combination is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from pathlib import Path

log = logging.getLogger("harmonica")

# Compute commands use this many torch threads unless --threads says otherwise: on the testbed, one
# thread was measured faster than two on a busy 2-core machine (README, "Command line"; the numbers
# come from benchmarks/threads.py). None: torch's own default (large models, where threads pay off).
TESTBED_THREADS = 1


class UsageError(Exception):
    """Bad input from the command line: exit code 2, one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------- values
# One rule per kind of value, applied to every option of that name in every command (check_values):
# argparse has already refused what is not a number at all.
def _integer(low: int):
    def rule(value):
        return None if value >= low else f"must be an integer >= {low}, got {value}"
    return rule


def _real(low: float, high: float | None = None, *, above: bool = False):
    def rule(value):
        ok = math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)
        if ok:
            return None
        bound = f"> {low:g}" if above else f">= {low:g}"
        span = f"in [{low:g}, {high:g}]" if high is not None else bound
        return f"must be a finite number {span}, got {value}"
    return rule


RULES = {
    "threads": _integer(1), "seed": _integer(0), "steps": _integer(1), "num_images": _integer(1),
    "rounds": _integer(1), "iterations": _integer(1), "batch_size": _integer(1), "batch": _integer(1),
    "samples": _integer(2), "timing_samples": _integer(1), "timing_repeats": _integer(1),
    "fewer_steps": _integer(1), "guidance": _real(0.0), "threshold": _real(0.0, 1.0),
    "target_speedup": _real(1.0, above=True),
}


def _each(rule):
    """A RULES entry for a list option: ``rule`` for every item."""
    def each(values):
        return next((problem for problem in map(rule, values) if problem), None)
    return each


def check_values(args, **overrides) -> None:
    """Apply RULES (and per-command ``overrides``) to every option ``args`` holds a value for."""
    for name, rule in {**RULES, **overrides}.items():
        value = getattr(args, name, None)
        if value is not None:
            problem = rule(value)
            if problem:
                raise UsageError(f"--{name.replace('_', '-')}: {problem}")


def _only_with(args, condition: bool, needs: str, *names: str) -> None:
    """Refuse options that would have no effect unless ``condition`` (e.g. --iterations without --train)."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, False)]
    if given and not condition:
        raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without {needs}; "
                         f"add {needs} or remove {' and '.join(given)}")


def _writable(path, flag: str) -> Path:
    from .formats import check_writable

    try:
        return check_writable(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _writable_files(folder, flag: str, names) -> Path:
    """Check that every file a command will write into ``folder`` (an output folder) can be written."""
    from .formats import check_folder

    try:
        check_folder(folder, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in names:
        _writable(Path(folder) / name, flag)
    return Path(folder)


# ----------------------------------------------------------------------------------------- inputs
STATIC_SCHEDULE = re.compile(r"(fora|taylorseer):(.*)")
STATIC_SCHEDULE_HELP = "fora:INTERVAL or taylorseer:INTERVAL:ORDER (a static schedule for the steps)"


def _load_plan(path: str, flag: str, *, steps: int | None = None, blocks: int | None = None):
    """A Router or a Schedule from a .safetensors file, whichever the file holds; with ``steps`` and
    ``blocks``, also a static schedule named by STATIC_SCHEDULE (FORA or TaylorSeer)."""
    from .schedule import load_plan

    p = Path(path)
    named = STATIC_SCHEDULE.fullmatch(path)
    if named and steps is not None and not p.exists():
        return _static_schedule(named[1], named[2], flag, steps, blocks)
    if not p.exists():
        raise UsageError(f"{flag}: schedule/router file not found: {path}")
    try:
        return load_plan(p)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _static_schedule(method: str, numbers: str, flag: str, steps: int, blocks: int):
    from .schedule import MAX_ORDER, Schedule

    form = "fora:INTERVAL" if method == "fora" else "taylorseer:INTERVAL:ORDER"
    parts = numbers.split(":")
    if len(parts) != form.count(":") or not all(part.isdigit() for part in parts):
        raise UsageError(f"{flag} {method}:{numbers}: expected {form} with whole numbers, e.g. "
                         f"{'fora:2' if method == 'fora' else 'taylorseer:3:2'}")
    interval, *order = (int(part) for part in parts)
    if not 2 <= interval < steps:
        raise UsageError(f"{flag} {method}:{numbers}: the interval must be in [2, {steps - 1}] for {steps} steps "
                         f"(1 computes every step, {steps} or more skips every step after the first), got {interval}")
    if order and not 0 <= order[0] <= MAX_ORDER:
        raise UsageError(f"{flag} {method}:{numbers}: the order must be in [0, {MAX_ORDER}] (0 = reuse), got {order[0]}")
    if method == "fora":
        return Schedule.fora(steps, blocks, interval)
    return Schedule.taylorseer(steps, blocks, interval, order[0])


def _plan_with_threshold(plan, args, flag: str):
    """The Schedule of ``plan`` at --threshold; a threshold for a Schedule (already boolean) is refused."""
    from .schedule import Router

    if isinstance(plan, Router):
        return plan.to_schedule(args.threshold)
    if args.threshold is not None:
        raise UsageError(f"--threshold applies to routers, but {flag} is a schedule (already a boolean plan); "
                         f"remove --threshold")
    return plan


def _best_router(sampler: str, steps: int, otherwise: str):
    """(name, router): the best bundled router for the sampler and steps (testbed.routers.BEST_ROUTERS);
    ``otherwise``: what the command offers instead when there is none."""
    from .testbed.routers import BEST_ROUTERS, load_router

    name = BEST_ROUTERS.get((sampler, steps))
    if name is None:
        have = ", ".join(f"--scheduler {s} --steps {n}" for s, n in BEST_ROUTERS)
        raise UsageError(f"--scheduler {sampler} --steps {steps}: there is no bundled router for these "
                         f"(bundled: {have}); pass one of those, or {otherwise}")
    return name, load_router(name, sampler, steps)


def _read_json(path: Path, flag: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: {path} is not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: {path} must hold a JSON object")
    return value


def _model_source(spec: str, flag: str = "--model") -> tuple[Path, Path]:
    """(transformer folder, scheduler config file) of 'testbed' or a local diffusers pipeline/transformer folder."""
    if spec == "testbed":
        from .testbed import DIT_DIR

        return _testbed_source(DIT_DIR, flag)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{flag} {spec!r}: no such directory; this machine has no model hub access, "
                         f"so give a local diffusers pipeline or transformer folder (or 'testbed')")
    if not path.is_dir():
        raise UsageError(f"{flag} {spec!r} is a file; give a local diffusers pipeline or transformer folder")
    if (path / "model_index.json").is_file():
        if "transformer" not in _read_json(path / "model_index.json", flag):
            raise UsageError(f"{flag} {spec!r}: the pipeline has no transformer (a UNet pipeline?); harmonica "
                             f"caches Diffusion Transformers (DiT, PixArt)")
        folder, scheduler_file = path / "transformer", path / "scheduler" / "scheduler_config.json"
    else:
        folder, scheduler_file = path, path.parent / "scheduler" / "scheduler_config.json"
    if not (folder / "config.json").is_file():
        raise UsageError(f"{flag} {spec!r}: no config.json in {folder}; give a diffusers pipeline or "
                         f"transformer folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UsageError(f"{flag} {spec!r}: no weights (*.safetensors or *.bin) in {folder}; save the model "
                         f"with save_pretrained")
    if not scheduler_file.is_file():
        raise UsageError(f"{flag} {spec!r}: put the training noise schedule in {scheduler_file}")
    return folder, scheduler_file


def _testbed_source(folder, flag: str) -> tuple[Path, Path]:
    """(DiT folder, scheduler config file) of an exported testbed DiT folder (the bundled one or --dit-dir)."""
    folder = Path(folder)
    for needed in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        if not (folder / needed).is_file():
            raise UsageError(f"{flag} {folder}: {needed} is missing; export a testbed DiT with "
                             f"`python -m harmonica.testbed.train --what dit --export`")
    return folder, folder / "scheduler" / "scheduler_config.json"


def _structure(folder: Path, flag: str):
    """(transformer on the meta device, its ModelFacts) from ``folder``/config.json: no weights are read."""
    import diffusers
    import torch

    from .adapters import model_facts, supported_models

    config = _read_json(folder / "config.json", flag)
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(cls, "from_config")):
        raise UsageError(f"{flag}: {folder / 'config.json'} names model class {class_name!r}, not a diffusers "
                         f"model; harmonica supports: {supported_models()}")
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
        return model, model_facts(model)
    except TypeError as e:  # model_facts: not a supported family (a UNet, ...)
        raise UsageError(f"{flag}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{flag}: cannot build {class_name} from {folder / 'config.json'} ({e})") from None


def _testbed_structure(args, dit_dir=None, flag: str = "--model"):
    """Check the testbed DiT files and keep its structure and scheduler config on ``args``."""
    from .testbed import DIT_DIR

    folder, scheduler_file = _testbed_source(dit_dir or DIT_DIR, flag)
    args.model_structure, args.facts = _structure(folder, flag)
    args.scheduler_config = _read_json(scheduler_file, flag)
    args.on_testbed = True


def _sampler(args, name: str):
    from .sampling import make_scheduler

    return make_scheduler(name, args.scheduler_config)


def _check_plan_fits(schedule, args, flag: str, *, steps: int | None, sampler) -> None:
    """``schedule`` against the model's facts, --steps and the sampler, before any work."""
    from .schedule import check_sampler

    if steps is not None and steps != schedule.num_steps:
        raise UsageError(f"--steps {steps} does not match {flag}, made for {schedule.num_steps} steps; pass "
                         f"--steps {schedule.num_steps} or omit --steps")
    facts = args.facts
    try:
        schedule.check_compatible(num_blocks=facts.num_blocks, model_class=facts.model_class,
                                  block_width=facts.block_width)
        check_sampler(schedule, sampler)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


# ----------------------------------------------------------------------------------------- training
# TrainConfig fields as the options that set them, so library messages name what the user typed.
_FLAGS = {"num_steps": "--steps", "guidance_scale": "--guidance", "batch_size": "--batch-size",
          "iterations": "--iterations", "target_speedup": "--target-speedup", "seed": "--seed",
          "checkpoint_dir": "--checkpoint-dir", "resume": "--resume", "log_file": "--log-file",
          "method": "--method", "conditioning": "--model/--prompt-embeds", "forecast_order": "--forecast-order"}


def _in_flags(error: Exception) -> UsageError:
    return UsageError(re.sub(r"TrainConfig\.(\w+)", lambda m: _FLAGS.get(m.group(1), m.group(0)), str(error)))


def _conditioning(args, facts, prompt_embeds: str | None):
    from .formats import read_tensors
    from .train import ClassConditioning, PromptConditioning

    if facts.conditioning == "class":
        if prompt_embeds:
            raise UsageError(f"--prompt-embeds: {facts.model_class} is class-conditioned and takes no prompt "
                             f"embeddings; remove --prompt-embeds")
        if facts.null_class is None and args.guidance != 1:
            raise UsageError(f"--guidance {args.guidance:g}: {facts.model_class} has no unconditional label, so it "
                             f"cannot use classifier-free guidance; pass --guidance 1")
        # Without guidance the null label is never used; any valid id keeps ClassConditioning well-formed.
        null = facts.null_class if facts.null_class is not None else 0
        return ClassConditioning(num_classes=facts.num_classes, null_class=null)
    if not prompt_embeds:
        raise UsageError(f"--prompt-embeds: {facts.model_class} is text-conditioned; pass --prompt-embeds FILE "
                         f"with text-encoder outputs (safetensors: embeds, mask, negative_embeds, negative_mask)")
    names = ("embeds", "mask", "negative_embeds", "negative_mask")
    try:
        tensors, _ = read_tensors(prompt_embeds, "--prompt-embeds")
        unknown = sorted(set(tensors) - set(names))
        if "embeds" not in tensors or unknown:
            raise ValueError(f"expected tensors 'embeds' (N, S, D) and optionally 'mask', 'negative_embeds', "
                             f"'negative_mask'; found {sorted(tensors)}")
        return PromptConditioning(**{k: tensors.get(k) for k in names})
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--prompt-embeds {prompt_embeds}: {e}") from None


def _prepare_training(args, *, method: str, batch_size: int, iterations: int, prompt_embeds=None,
                      checkpoint_dir=None, resume=False, log_file=None):
    """The TrainConfig and scheduler of a run, checked against the model's structure (no weights)."""
    from .train import TrainConfig
    from .train.trainer import check_training

    facts = args.facts
    if method == "l2c":
        if not args.on_testbed:
            raise UsageError("--method l2c needs real training images; from the command line it runs on the "
                             "testbed only (from Python pass TrainConfig(l2c_latents=...))")
        if args.scheduler != "ddim":
            raise UsageError(f"--method l2c trains for DDIM only (as its reference code), got --scheduler "
                             f"{args.scheduler}; pass --scheduler ddim or --method harmonica")
    conditioning = _conditioning(args, facts, prompt_embeds)
    extra = {}
    if method == "l2c":
        from .testbed.data import load_tensors

        images, labels = load_tensors("train")  # a missing data set is bad input: exit 2 with the fix
        extra = {"l2c_latents": images, "l2c_choices": labels}
    if args.on_testbed:
        from .testbed.routers import RECIPE

        extra.update(RECIPE)  # as the demo's router was trained
    extra["forecast_order"] = getattr(args, "forecast_order", 0)
    start = None
    if getattr(args, "init_taylorseer", None) is not None:
        from .schedule import Schedule
        from .train import start_from

        if args.init_taylorseer >= args.steps:
            raise UsageError(f"--init-taylorseer {args.init_taylorseer}: the interval must be below --steps "
                             f"({args.steps}), or nothing would be skipped")
        start = Schedule.taylorseer(args.steps, facts.num_blocks, args.init_taylorseer, extra["forecast_order"])
        extra.update(start_from(start))
    scheduler = _sampler(args, args.scheduler)
    try:
        config = TrainConfig(method=method, num_steps=args.steps, conditioning=conditioning,
                             guidance_scale=args.guidance, batch_size=batch_size, iterations=iterations,
                             target_speedup=args.target_speedup, seed=args.seed, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=5 if checkpoint_dir else 0, resume=resume, log_file=log_file,
                             progress=not args.quiet, **extra)
        if start is not None and config.target_speedup is None:  # the speed of the schedule it starts from
            from .train.trainer import training_cost

            config.target_speedup = start.theoretical_speedup(training_cost(args.model_structure, config))
        check_training(args.model_structure, scheduler, config)
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: no checkpoint to resume from
        raise _in_flags(e) from None
    return config, scheduler


def _load_weights(spec: str):
    """The transformer of 'testbed' or a local diffusers folder, weights loaded (the work begins here)."""
    import diffusers

    if spec == "testbed":
        from . import testbed

        return testbed.load().transformer
    folder, _ = _model_source(spec)
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    return cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).eval().requires_grad_(False)


def _train(transformer, args):
    from .train import train_router

    return train_router(transformer, args.train_scheduler, args.train_config)


# ----------------------------------------------------------------------------------------- helpers
def _testbed_runs(bed, contenders: dict, labels, args) -> tuple[dict, dict]:
    """Samples of the testbed from the same noise for each contender (name -> (schedule or None, steps)),
    and their best wall times over interleaved rounds."""
    from . import testbed
    from .timing import best_times, cached_copy

    models = {name: bed.transformer if schedule is None else cached_copy(bed.transformer, schedule)
              for name, (schedule, _) in contenders.items()}
    images = {}

    def run(name):
        images[name] = testbed.generate(bed, labels, transformer=models[name], seed=args.seed,
                                        num_inference_steps=contenders[name][1], guidance_scale=args.guidance,
                                        sampler=args.scheduler, progress=not args.quiet)
    # No separate warm-up: the first round warms the allocator and thread pool, and the best round counts.
    times = best_times({name: (lambda name=name: run(name)) for name in contenders}, repeats=args.rounds,
                       warmup=False)
    return images, times


def torch_arange_labels(n: int, num_classes: int):
    import torch

    return torch.arange(n) % num_classes


# ----------------------------------------------------------------------------------------- demo
DEMO_FILES = ("samples.png", "schedule.png", "summary.json")


def check_demo(args) -> None:
    check_values(args)
    _only_with(args, args.train, "--train", "iterations", "target_speedup")
    _writable_files(args.out, "--out", DEMO_FILES + (("router.safetensors",) if args.train else ()))
    _testbed_structure(args)
    if args.train:
        args.train_config, args.train_scheduler = _prepare_training(
            args, method="harmonica", batch_size=8, iterations=args.iterations or 40)
    else:
        args.router_name, args.router = _best_router(args.scheduler, args.steps, "--train to train one first")
        _check_plan_fits(args.router.to_schedule(), args, "the bundled router", steps=args.steps,
                         sampler=_sampler(args, args.scheduler))


def cmd_demo(args) -> int:
    from . import evaluate, testbed
    from .apply import model_cost
    from .formats import write_text
    from .viz import plot_schedule, save_image_grid

    out = Path(args.out)
    bed = testbed.load()
    if args.train:
        log.info("training a HarmoniCa router on the testbed (%d trajectories)", args.train_config.iterations)
        router = _train(bed.transformer, args)
        router.save(out / "router.safetensors")
        args.router_name = "harmonica (trained by --train)"
    else:
        router = args.router
    schedule = router.to_schedule()
    cost = model_cost(bed.transformer, batch=2 * min(args.num_images, 250))
    theoretical = schedule.theoretical_speedup(cost)
    # The trivial alternative: as many steps as the cached run's FLOPs buy (so at least as fast, the
    # frontier's rule for a rival); the epsilon keeps an exact ratio such as 20 / 2.5 from rounding down.
    fewer = max(1, math.floor(args.steps / theoretical + 1e-9))
    labels = torch_arange_labels(args.num_images, len(bed.class_names))
    log.info("sampling %d images uncached, cached and with %d steps (%s, %d steps, guidance %.1f)",
             args.num_images, fewer, args.scheduler, args.steps, args.guidance)
    images, times = _testbed_runs(bed, {"uncached": (None, args.steps), "cached": (schedule, args.steps),
                                        "fewer": (None, fewer)}, labels, args)
    uncached = images["uncached"]

    def row(name):
        return {"seconds": times[name], "measured_speedup": times["uncached"] / times[name],
                "psnr_vs_uncached_db": float(evaluate.psnr(images[name], uncached).mean()),
                "ssim_vs_uncached": float(evaluate.ssim(images[name], uncached).mean()),
                "accuracy": evaluate.classifier_accuracy(images[name], labels)}

    summary = {
        "images": args.num_images,
        "router": args.router_name,
        "forecast_order": router.forecast_order,
        "cache_usage": schedule.cache_usage,
        "theoretical_speedup": theoretical,
        "uncached": {"steps": args.steps, "seconds": times["uncached"],
                     "accuracy": evaluate.classifier_accuracy(uncached, labels)},
        "cached": {"steps": args.steps, **row("cached")},
        "fewer_steps": {"steps": fewer, "theoretical_speedup": args.steps / fewer, **row("fewer")},
    }
    cached = summary["cached"]
    out.mkdir(parents=True, exist_ok=True)
    n_show = min(10, args.num_images)
    save_image_grid([uncached[:n_show], images["cached"][:n_show], images["fewer"][:n_show]], out / "samples.png",
                    row_labels=["uncached", "cached", f"{fewer} steps"],
                    column_labels=[bed.class_names[int(y)] for y in labels[:n_show]],
                    title=f"same noise, {args.steps} {args.scheduler} steps; cached: CUR {schedule.cache_usage:.0%}, "
                          f"{cached['measured_speedup']:.2f}x faster; {fewer} steps: "
                          f"{summary['fewer_steps']['measured_speedup']:.2f}x")
    plot_schedule(router, out / "schedule.png",
                  title=f"{summary['router']} router, testbed DiT, {args.scheduler} {args.steps} steps")
    write_text(out / "summary.json", json.dumps(summary, indent=2), "--out")
    print(f"uncached, {args.steps} steps: {times['uncached']:.2f} s, classifier accuracy "
          f"{summary['uncached']['accuracy']:.1%}")
    for name, label in (("cached", f"cached ({summary['router']}, CUR {schedule.cache_usage:.1%}, "
                                   f"{theoretical:.2f}x theoretical)"),
                        ("fewer_steps", f"fewer steps ({fewer}, {args.steps / fewer:.2f}x theoretical)")):
        r = summary[name]
        print(f"{label}: {r['measured_speedup']:.2f}x measured | PSNR {r['psnr_vs_uncached_db']:.1f} dB, "
              f"SSIM {r['ssim_vs_uncached']:.3f} vs uncached | classifier accuracy {r['accuracy']:.1%}")
    print(f"wrote {out / 'samples.png'}, {out / 'schedule.png'}, {out / 'summary.json'}")
    return 0


# ----------------------------------------------------------------------------------------- train
def check_train(args) -> None:
    from .train.checkpoint import path_in

    check_values(args, steps=_integer(2), init_taylorseer=_integer(2))
    from .schedule import MAX_ORDER

    if not 0 <= args.forecast_order <= MAX_ORDER:
        raise UsageError(f"--forecast-order: must be an integer in [0, {MAX_ORDER}] (0 = reuse), got {args.forecast_order}")
    _only_with(args, bool(args.checkpoint_dir), "--checkpoint-dir", "resume")
    _writable(args.out, "--out")
    if args.checkpoint_dir:
        _writable(path_in(args.checkpoint_dir), "--checkpoint-dir")
    if args.log_file:
        _writable(args.log_file, "--log-file")
    folder, scheduler_file = _model_source(args.model)
    args.model_structure, args.facts = _structure(folder, "--model")
    args.scheduler_config = _read_json(scheduler_file, "--model")
    args.on_testbed = args.model == "testbed"
    args.train_config, args.train_scheduler = _prepare_training(
        args, method=args.method, batch_size=args.batch_size, iterations=args.iterations,
        prompt_embeds=args.prompt_embeds, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        log_file=args.log_file)


def cmd_train(args) -> int:
    router = _train(_load_weights(args.model), args)
    router.save(args.out)
    print(f"wrote {args.out}: CUR {router.metadata.get('achieved_cur', float('nan')):.1%}, theoretical "
          f"speedup {router.metadata.get('theoretical_speedup', float('nan')):.2f}x")
    return 0


# ----------------------------------------------------------------------------------------- sample
def check_sample(args) -> None:
    check_values(args)
    if args.model != "testbed":
        raise UsageError("--model: sample runs the bundled testbed (--model testbed); for a diffusers pipeline "
                         "use harmonica.enable_cache(pipe, schedule) from Python (see README)")
    _writable_files(args.out, "--out", ("samples.png",))
    _testbed_structure(args)
    steps = args.steps or 20  # of a named static schedule or the bundled router (a file keeps its own)
    if args.schedule:
        flag = f"--schedule {args.schedule}"
        plan = _load_plan(args.schedule, "--schedule", steps=steps, blocks=args.facts.num_blocks)
    else:
        otherwise = (f"--schedule with a router file or a static schedule such as taylorseer:3:2, or train a router "
                     f"with `harmonica train --scheduler {args.scheduler} --steps {steps} --out r.safetensors`")
        plan, flag = _best_router(args.scheduler, steps, otherwise)[1], "the bundled router"
    args.plan = _plan_with_threshold(plan, args, flag)
    _check_plan_fits(args.plan, args, flag, steps=args.steps, sampler=_sampler(args, args.scheduler))


def cmd_sample(args) -> int:
    from . import testbed
    from .viz import save_image_grid

    bed = testbed.load()
    schedule = args.plan
    labels = torch_arange_labels(args.num_images, len(bed.class_names))
    images, times = _testbed_runs(bed, {"uncached": (None, schedule.num_steps), "cached": (schedule, schedule.num_steps)},
                                  labels, args)
    cached, t_uncached, t_cached = images["cached"], times["uncached"], times["cached"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid([cached[i:i + 10] for i in range(0, len(cached), 10)], out / "samples.png",
                    title=f"cached samples, CUR {schedule.cache_usage:.0%}")
    print(f"{args.num_images} images in {t_cached:.2f} s cached vs {t_uncached:.2f} s uncached "
          f"({t_uncached / t_cached:.2f}x); wrote {out / 'samples.png'}")
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def check_evaluate(args) -> None:
    check_values(args)
    from .testbed import DEFAULT_SAMPLER, DEFAULT_STEPS

    steps = args.steps or DEFAULT_STEPS
    if args.fewer_steps is not None and args.fewer_steps >= steps:
        raise UsageError(f"--fewer-steps must be below the table's {steps} steps (--steps), got {args.fewer_steps}")
    if args.timing_samples is not None and args.timing_samples > args.samples:
        raise UsageError(f"--timing-samples {args.timing_samples} is more than --samples {args.samples}; the "
                         f"timing batch is drawn from the samples: pass at most {args.samples}")
    if args.out:
        _writable_files(args.out, "--out", ("table.md", "table.json"))
    _check_routers(args, steps, DEFAULT_SAMPLER)


def _check_routers(args, steps: int, sampler_name: str, *, schedules: bool = False) -> None:
    """--router NAME=PATH options of evaluate and the frontier: distinct names, router files (or schedule
    files, with ``schedules``) that fit the testbed DiT (--dit-dir), ``steps`` and the sampler."""
    from .schedule import Router

    routers = {}
    for spec in args.router:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise UsageError(f"--router expects NAME=PATH (e.g. harmonica=router.safetensors), got {spec!r}")
        if name in routers:
            raise UsageError(f"--router {name} is given twice; give each router its own NAME")
        routers[name] = path
    _testbed_structure(args, args.dit_dir, "--dit-dir")
    sampler = _sampler(args, sampler_name)
    for name, path in routers.items():
        plan = _load_plan(path, f"--router {name}")
        if not (schedules or isinstance(plan, Router)):
            raise UsageError(f"--router {name}: {path} is a schedule, not a router; the comparison takes router files "
                             f"(the frontier, `harmonica evaluate --frontier`, takes schedules too)")
        _check_plan_fits(plan, args, f"--router {name}={path}", steps=steps, sampler=sampler)


def cmd_evaluate(args) -> int:
    from .compare import run

    run(args, progress=not args.quiet)
    return 0


def check_frontier(args) -> None:
    from .testbed import DEFAULT_SAMPLER, DEFAULT_STEPS

    steps = args.steps or DEFAULT_STEPS
    check_values(args, seeds=_each(_integer(0)), fewer_steps=_each(_integer(1)), fora=_each(_integer(2)),
                 taylorseer=_each(_integer(2)), orders=_each(_integer(1)), reference_seeds=_integer(0),
                 timing_rounds=_integer(1), samples=_integer(2))
    if args.plot:
        for folder in args.plot:
            if not (Path(folder) / "frontier.json").is_file():
                raise UsageError(f"--plot {folder}: no frontier.json there; give folders written by --out")
        _writable(args.png or Path(args.plot[0]) / "frontier.png", "--png")
        return
    _only_with(args, False, "--plot", "png")
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        raise UsageError(f"--seeds must be distinct seeds (comma-separated), got {args.seeds}")
    if args.fewer_steps and max(args.fewer_steps) >= steps:
        raise UsageError(f"--fewer-steps must be below T = {steps} (--steps), got {max(args.fewer_steps)}")
    from .schedule import MAX_ORDER

    too_high = [m for m in args.orders if m > MAX_ORDER]
    if too_high:
        raise UsageError(f"--orders: forecast orders go up to {MAX_ORDER}, got {too_high[0]}")
    if args.no_timing and args.retime:
        raise UsageError("--no-timing and --retime contradict each other; keep one")
    if args.out:
        _writable_files(args.out, "--out", ("frontier.json", "table.md", "frontier.png"))
    if args.cache_dir:
        _writable_files(args.cache_dir, "--cache-dir", ())
    _check_routers(args, steps, args.scheduler or DEFAULT_SAMPLER, schedules=True)


def cmd_frontier(args) -> int:
    from .frontier import run

    run(args, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------------------------------- plot
def check_plot(args) -> None:
    check_values(args)
    from matplotlib.backend_bases import FigureCanvasBase

    args.plan = _load_plan(args.schedule, "plot")
    _plan_with_threshold(args.plan, args, args.schedule)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UsageError(f"--out {args.out}: the file name must end in an image format matplotlib writes "
                         f"({', '.join('.' + f for f in sorted(formats))}), e.g. {Path(args.out).stem or 'plan'}.png")
    _writable(args.out, "--out")


def cmd_plot(args) -> int:
    from .viz import plot_schedule

    path = plot_schedule(args.plan, args.out, threshold=args.threshold, title=args.title)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------- bench
def check_bench(args) -> None:
    check_values(args)
    from diffusers import DDIMScheduler

    from .schedule import Schedule, check_sampler

    if args.shape == "testbed":
        _testbed_structure(args)
        blocks = args.facts.num_blocks
    else:
        from .timing import DIT_SHAPES

        blocks = DIT_SHAPES[args.shape]["num_layers"]
    if args.schedule:
        flag = f"--schedule {args.schedule}"
        plan = _load_plan(args.schedule, "--schedule", steps=args.steps or 10, blocks=blocks)
        args.plan = _plan_with_threshold(plan, args, flag)
        if args.steps is not None and args.steps != args.plan.num_steps:
            raise UsageError(f"--steps {args.steps} does not match {flag}, made for {args.plan.num_steps} steps; "
                             f"pass --steps {args.plan.num_steps} or omit --steps")
        try:
            args.plan.check_compatible(num_blocks=blocks)
            check_sampler(args.plan, DDIMScheduler())  # bench samples with DDIM
        except ValueError as e:
            raise UsageError(f"{flag} with --shape {args.shape}: {e}") from None
    else:
        _only_with(args, False, "--schedule", "threshold")
        args.plan = Schedule.fora(args.steps or 10, blocks, 2)
    args.steps = args.plan.num_steps
    if args.json:
        _writable(args.json, "--json")


def _bench_model(shape: str, device: str = "cpu"):
    """The model `harmonica bench` times: the bundled testbed DiT (always loaded with its weights), or a
    random-weight DiT of a timing.DIT_SHAPES shape built on ``device`` ("meta": the structure alone)."""
    if shape == "testbed":
        from . import testbed

        return testbed.load().transformer
    from .timing import random_dit

    return random_dit(shape, device=device)


def _bench_side(args) -> int:
    """One side of `harmonica bench` (--side): the model, uncached or cached, timed by serve_runs."""
    import torch
    from diffusers import DDIMScheduler

    from .apply import enable_cache
    from .sampling import sample
    from .timing import serve_runs

    model = _bench_model(args.shape)
    if args.side == "cached":
        enable_cache(model, args.plan)  # once, as a user does: the slots stay warm from run to run
    size, channels = model.config.sample_size, model.config.in_channels
    latents = torch.randn(args.batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(args.batch, dtype=torch.long)
    null = model.transformer_blocks[0].norm1.emb.class_embedder.num_classes

    def run():
        sample(model, DDIMScheduler(), latents, num_inference_steps=args.steps, cond={"class_labels": labels},
               uncond={"class_labels": torch.full_like(labels, null)}, guidance_scale=1.5, progress=False)

    serve_runs(run)
    return 0


def cmd_bench(args) -> int:
    import torch

    from .apply import model_cost
    from .timing import measure_processes

    if args.side:
        return _bench_side(args)
    # Each side in a plain process of its own, as a user runs it (no allocator tuning; one model per
    # process: two models sharing one allocator fault each other's activations in afresh).
    side_args = ["--shape", args.shape, "--steps", str(args.steps), "--batch", str(args.batch),
                 "--threads", str(torch.get_num_threads()), "--quiet"]
    if args.schedule:
        side_args += ["--schedule", str(args.schedule)]
    if args.threshold is not None:
        side_args += ["--threshold", repr(args.threshold)]
    timings = measure_processes({side: [sys.executable, "-m", "harmonica", "bench", *side_args, "--side", side]
                                 for side in ("uncached", "cached")}, repeats=args.rounds)
    schedule = args.plan
    blocks = schedule.num_blocks
    t_uncached, t_cached = timings["uncached"].seconds, timings["cached"].seconds
    structure = _bench_model(args.shape, "meta")  # for the FLOP count
    theoretical = schedule.theoretical_speedup(model_cost(structure, batch=2 * args.batch))
    measured = t_uncached / t_cached
    result = {"shape": args.shape, "blocks": blocks, "batch": args.batch, "steps": args.steps,
              "cache_usage": schedule.cache_usage, "uncached_s": t_uncached, "cached_s": t_cached,
              "measured_speedup": measured, "theoretical_speedup": theoretical,
              "measured_over_theoretical": measured / theoretical, "threads": torch.get_num_threads(),
              "page_faults_uncached": timings["uncached"].page_faults,
              "page_faults_cached": timings["cached"].page_faults,
              "uncached_cpu_s": timings["uncached"].cpu_seconds, "cached_cpu_s": timings["cached"].cpu_seconds,
              "measured_speedup_cpu": timings["uncached"].cpu_seconds / timings["cached"].cpu_seconds}
    print(f"{args.shape}: {blocks} blocks, batch {args.batch} (x2 CFG), {args.steps} steps, CUR "
          f"{schedule.cache_usage:.1%}, {torch.get_num_threads()} thread(s): uncached {t_uncached:.3f} s, cached "
          f"{t_cached:.3f} s -> {measured:.2f}x measured, {theoretical:.2f}x theoretical ({measured / theoretical:.1%}); "
          f"page faults per run {result['page_faults_uncached']} uncached, {result['page_faults_cached']} cached; "
          f"by CPU time {result['measured_speedup_cpu']:.2f}x ({result['measured_speedup_cpu'] / theoretical:.1%})")
    if args.json:
        from .formats import write_text

        write_text(args.json, json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .compare import add_arguments as add_comparison_arguments
    from .frontier import add_arguments as add_frontier_arguments
    from .sampling import SCHEDULERS
    from .testbed import DEFAULT_GUIDANCE

    parser = _Parser(prog="harmonica", description="Learned feature caching for Diffusion Transformers.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or info messages (results are still printed)")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    compute = argparse.ArgumentParser(add_help=False)
    compute.add_argument("--threads", type=int, default=None,
                         help=f"torch CPU threads (default: {TESTBED_THREADS} on the testbed, measured fastest; "
                              f"torch's default for other models)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, check, func, *, computes=True, **kwargs):
        p = subparsers.add_parser(name, parents=[common] + ([compute] if computes else []), **kwargs)
        p.set_defaults(check=check, func=func)
        return p

    def common_sampling(p, steps=20):
        p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="diffusers sampler (default ddim)")
        p.add_argument("--steps", type=int, default=steps,
                       help="model evaluations per image (default: %s)" % (steps or "the schedule's"))
        p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                       help="classifier-free guidance scale >= 0 (default: the testbed's, %(default)s)")
        p.add_argument("--seed", type=int, default=0)

    p = command("demo", check_demo, cmd_demo,
                help="cached vs uncached sampling of the bundled testbed DiT, with plots")
    common_sampling(p)
    p.add_argument("--num-images", type=int, default=100, help="images per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved timing rounds, the first one warms up, best kept (default %(default)s)")
    p.add_argument("--out", default="outputs/demo", help="folder for samples.png, schedule.png, summary.json")
    p.add_argument("--train", action="store_true", help="train the router instead of loading the bundled one")
    p.add_argument("--iterations", type=int, default=None, help="training trajectories with --train (default 40)")
    p.add_argument("--target-speedup", type=float, default=None, help="target theoretical speedup with --train")

    p = command("train", check_train, cmd_train,
                help="train a router (HarmoniCa or L2C); multi-process under torchrun")
    common_sampling(p)
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default) or a local diffusers pipeline / transformer folder")
    p.add_argument("--prompt-embeds", default=None,
                   help="PixArt: safetensors with text-encoder outputs (embeds, mask, negative_embeds, negative_mask)")
    p.add_argument("--method", default="harmonica", choices=("harmonica", "l2c"))
    p.add_argument("--iterations", type=int, default=80, help="HarmoniCa: trajectories; L2C: updates")
    p.add_argument("--batch-size", type=int, default=8, help="samples per process per iteration")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="theoretical speedup to aim at (> 1; with --init-taylorseer default: that schedule's)")
    p.add_argument("--forecast-order", type=int, default=0,
                   help="how skipped units are served: 0 = reuse (default), 1-4 = forecast of that order")
    p.add_argument("--init-taylorseer", type=int, default=None, metavar="N",
                   help="start from TaylorSeer's schedule of interval N (at --forecast-order) and learn where to "
                        "move its computes (harmonica.train.start_from)")
    p.add_argument("--checkpoint-dir", default=None, help="folder for the training checkpoint (every 5 iterations)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--log-file", default=None, help="JSON lines, one per iteration")
    p.add_argument("--out", required=True, help="router file to write (.safetensors)")

    p = command("sample", check_sample, cmd_sample,
                help="sample the testbed with a router/schedule applied; prints timing")
    common_sampling(p, steps=None)
    p.add_argument("--model", default="testbed", help="only 'testbed' (for other models use the Python API)")
    p.add_argument("--schedule", help=f"router or schedule .safetensors, or {STATIC_SCHEDULE_HELP} (default: the best "
                                      f"bundled router for --scheduler/--steps)")
    p.add_argument("--threshold", type=float, default=None, help="router threshold in [0, 1] (default: its own)")
    p.add_argument("--num-images", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved timing rounds, the first one warms up, best kept (default %(default)s)")
    p.add_argument("--out", default="outputs/sample", help="folder for samples.png")

    p = command("evaluate", check_evaluate, cmd_evaluate,
                help="comparison table (FID, accuracy, PSNR, CUR, speedups); same as python -m harmonica.compare. "
                     "With --frontier: quality vs measured speed of every method (harmonica evaluate --frontier -h)")
    add_comparison_arguments(p)

    p = command("frontier", check_frontier, cmd_frontier, prog=f"{parser.prog} evaluate --frontier",
                help="quality vs measured speed of every method on the testbed (= evaluate --frontier)",
                description="quality vs measured speed of every way of sampling faster on "
                     "the testbed (harmonica.frontier); run as `harmonica evaluate --frontier`")
    add_frontier_arguments(p)

    p = command("plot", check_plot, cmd_plot, computes=False, help="heatmap image of a router or schedule")
    p.add_argument("schedule", help="router or schedule .safetensors")
    p.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg, ...)")
    p.add_argument("--threshold", type=float, default=None, help="router threshold in [0, 1] (default: its own)")
    p.add_argument("--title", default=None)

    p = command("bench", check_bench, cmd_bench, help="end-to-end sampling latency with and without the cache")
    p.add_argument("--shape", default="dit-xl", choices=("dit-xl", "dit-b", "testbed"))
    p.add_argument("--schedule", help=f"router or schedule file, or {STATIC_SCHEDULE_HELP} (default: fora:2)")
    p.add_argument("--threshold", type=float, default=None, help="router threshold in [0, 1] (with --schedule)")
    p.add_argument("--steps", type=int, default=None, help="default: the schedule's, or 10")
    p.add_argument("--batch", type=int, default=1, help="images per batch (the transformer sees 2x with CFG)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, best kept")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    # Internal: the process that times one side (bench starts one per side).
    p.add_argument("--side", choices=("uncached", "cached"), default=None, help=argparse.SUPPRESS)
    return parser


def _use_threads(args) -> None:
    """--threads, else TESTBED_THREADS for commands on the testbed, else torch's default."""
    if not hasattr(args, "threads"):
        return
    import torch

    threads = args.threads or (TESTBED_THREADS if getattr(args, "on_testbed", False) else None)
    if threads is not None:
        torch.set_num_threads(threads)


def _say(kind: str, error: BaseException) -> None:
    # One line whatever the message holds: the contract is one line on stderr.
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"harmonica: {kind}: {text}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"harmonica: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"] and "--frontier" in argv:  # the frontier mode: its own options
        argv = ["frontier"] + [a for a in argv[1:] if a != "--frontier"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="harmonica: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        # As Python's defaults do outside __main__: deprecations are for developers, not for this user.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            try:
                args.check(args)
            except (UsageError, ValueError, TypeError, OSError) as e:  # bad input: nothing was done yet
                if args.debug:
                    raise
                _say("error", e)
                return 2
            _use_threads(args)
            return args.func(args)
        except KeyboardInterrupt:
            print("harmonica: interrupted", file=sys.stderr)
            return 130
        except UsageError as e:
            if args.debug:
                raise
            _say("error", e)
            return 2
        except Exception as e:  # noqa: BLE001 - the CLI's contract is one line and a non-zero exit
            if args.debug:
                raise
            _say("failed", f"{type(e).__name__}: {e}")
            return 1


if __name__ == "__main__":
    sys.exit(main())

"""The command line's front door: every argument, input file and output location is checked before any
work. A bad one gives exit code 2, one line on stderr naming the argument, no traceback, and nothing
loaded, trained or written. Every option either acts or is refused.

The commands run in this process (harmonica.cli.main) with the work patched to fail loudly: a case
that got past its checks would load a model, and the test would see exit code 1 instead of 2.
tests/test_cli.py drives the real executable in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import harmonica.compare
import harmonica.frontier
import harmonica.testbed
import harmonica.viz
from harmonica import cli, formats
from harmonica.schedule import Router, Schedule, sampler_grid
from harmonica.testbed import DIT_DIR

# Tiny models: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------------------------- inputs


def _model_folder(root, name, model):
    folder = root / "models" / name
    model.save_config(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # only its presence is checked
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every input file the cases refer to, made once. Keys fill the {placeholders} of the cases."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    from harmonica.sampling import make_scheduler

    root = tmp_path_factory.mktemp("inputs")
    scheduler_config = json.loads((DIT_DIR / "scheduler" / "scheduler_config.json").read_text())
    (root / "models" / "scheduler").mkdir(parents=True)
    shutil.copy(DIT_DIR / "scheduler" / "scheduler_config.json", root / "models" / "scheduler")
    with torch.device("meta"):
        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=8, num_layers=2, cross_attention_dim=16, caption_channels=12,
                                          sample_size=8, patch_size=2)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
    paths = {name: _model_folder(root, name, model) for name, model in
             (("dit", dit), ("pixart", pixart), ("unet", unet))}
    unet_pipeline = root / "unet_pipeline"
    unet_pipeline.mkdir()
    (unet_pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                                "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "no_weights").mkdir()
    dit.save_config(root / "no_weights")

    g = torch.Generator().manual_seed(0)
    embeds = {"embeds": torch.randn(3, 5, 12, generator=g), "negative_embeds": torch.randn(5, 12, generator=g)}
    save_file(embeds, str(root / "embeds.safetensors"))
    save_file({"embeds": torch.randn(3, 5, 7, generator=g), "negative_embeds": torch.randn(5, 7, generator=g)},
              str(root / "embeds_width7.safetensors"))
    save_file({**embeds, "embeds": torch.full((3, 5, 12), float("nan"))}, str(root / "embeds_nan.safetensors"))
    save_file({"prompts": torch.zeros(3, 5, 12)}, str(root / "embeds_renamed.safetensors"))

    ddim_grid = sampler_grid(make_scheduler("ddim", scheduler_config), 20)
    Router.init(20, 8, metadata={"sampler": "ddim", "timesteps": ddim_grid}).save(root / "router20.safetensors")
    Router.init(10, 8).save(root / "router10.safetensors")
    Schedule.fora(20, 8).save(root / "fora20.safetensors")
    Schedule.fora(20, 5).save(root / "fora20x5.safetensors")
    Schedule.fora(10, 8).save(root / "fora10.safetensors")
    (root / "junk.safetensors").write_bytes(b"not a safetensors file")
    (root / "afile").write_text("a regular file")
    os.mkfifo(root / "fifo.safetensors")

    (root / "empty_ckpt").mkdir()
    truncated = root / "truncated_ckpt" / "checkpoint.safetensors"
    formats.write(truncated, "train_checkpoint", {"logits": torch.zeros(20, 8, 2), "lambda": torch.ones(20)},
                  {"iteration": 5, "beta": 1e-3, "lambda_refreshes": 1, "updates": 95, "wall_time_s": 1.0})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    other = root / "other_ckpt" / "checkpoint.safetensors"
    formats.write(other, "train_checkpoint", {"logits": torch.zeros(20, 3, 2), "lambda": torch.ones(20)},
                  {"iteration": 5, "beta": 1e-3, "lambda_refreshes": 1, "updates": 95, "wall_time_s": 1.0,
                   "model": {"model_class": "DiTTransformer2DModel", "num_blocks": 3}, "sampler": "ddim"})
    return {"d": str(root), **{k: str(v) for k, v in paths.items()}}


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Every way a command starts its work (loading weights, training, sampling, plotting) fails loudly."""

    def forbidden(*args, **kwargs):
        raise WorkStarted("the command started its work")

    for target, name in ((harmonica.testbed, "load"), (cli, "_load_weights"), (cli, "_bench_model"),
                         (cli, "_train"), (harmonica.compare, "run"), (harmonica.viz, "plot_schedule")):
        monkeypatch.setattr(target, name, forbidden)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refuses malformed command lines itself
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(*folders) -> dict:
    return {str(f): sorted(str(p.relative_to(f)) for p in f.rglob("*")) for f in folders}


# ---------------------------------------------------------------------------------------------- the table
# (command line, text the one error line must contain). {d}: the input folder, {out}: an empty output
# folder of the test; {dit}, {pixart}, {unet}: model folders (config.json, no weights).
CASES = [
    # ---- demo
    ("demo --scheduler heun", "invalid choice: 'heun'"),
    ("demo --steps 0", "--steps: must be an integer >= 1, got 0"),
    ("demo --steps 7", "--scheduler ddim --steps 7: there is no bundled router for these (bundled: --scheduler ddim --steps 20, --scheduler ddim --steps 50); pass one of those, or --train to train one first"),
    ("demo --guidance -1", "--guidance: must be a finite number >= 0, got -1.0"),
    ("demo --guidance nan", "--guidance: must be a finite number >= 0, got nan"),
    ("demo --seed -1", "--seed: must be an integer >= 0, got -1"),
    ("demo --num-images -3", "--num-images: must be an integer >= 1, got -3"),
    ("demo --num-images abc", "argument --num-images: invalid int value: 'abc'"),
    ("demo --rounds 0", "--rounds: must be an integer >= 1, got 0"),
    ("demo --threads 0", "--threads: must be an integer >= 1, got 0"),
    ("demo --threads -1", "--threads: must be an integer >= 1, got -1"),
    ("demo --out {d}/afile", "--out {d}/afile is a file, not a folder"),
    ("demo --out {d}/afile/demo", "--out {d}/afile/demo cannot be created: {d}/afile is a file"),
    ("demo --out /proc/harmonica/demo", "no file can be created in /proc"),
    ("demo --iterations 5", "--iterations has no effect without --train"),
    ("demo --target-speedup 1.5", "--target-speedup has no effect without --train"),
    ("demo --train --iterations 0", "--iterations: must be an integer >= 1, got 0"),
    ("demo --train --target-speedup 1", "--target-speedup: must be a finite number > 1, got 1.0"),
    ("demo --train --target-speedup 50", "--target-speedup: 50.0 is unreachable"),
    ("demo --train --steps 1", "--steps: must be >= 2"),
    # ---- train
    ("train", "the following arguments are required: --out"),
    ("train --out {out}/r.safetensors --scheduler heun", "invalid choice: 'heun'"),
    ("train --out {out}/r.safetensors --steps 1", "--steps: must be an integer >= 2, got 1"),
    ("train --out {out}/r.safetensors --guidance -1", "--guidance: must be a finite number >= 0, got -1.0"),
    ("train --out {out}/r.safetensors --guidance inf", "--guidance: must be a finite number >= 0, got inf"),
    ("train --out {out}/r.safetensors --seed -5", "--seed: must be an integer >= 0, got -5"),
    ("train --out {out}/r.safetensors --method bogus", "argument --method: invalid choice: 'bogus'"),
    ("train --out {out}/r.safetensors --iterations 0", "--iterations: must be an integer >= 1, got 0"),
    ("train --out {out}/r.safetensors --batch-size 0", "--batch-size: must be an integer >= 1, got 0"),
    ("train --out {out}/r.safetensors --target-speedup 0.5", "--target-speedup: must be a finite number > 1"),
    ("train --out {out}/r.safetensors --target-speedup 50", "--target-speedup: 50.0 is unreachable"),
    ("train --out {out}/r.safetensors --threads 0", "--threads: must be an integer >= 1, got 0"),
    ("train --out {out}/r.safetensors --forecast-order 5", "--forecast-order: must be an integer in [0, 4] (0 = reuse), got 5"),
    ("train --out {out}/r.safetensors --init-taylorseer 1", "--init-taylorseer: must be an integer >= 2, got 1"),
    ("train --out {out}/r.safetensors --init-taylorseer 20", "--init-taylorseer 20: the interval must be below --steps (20)"),
    ("train --out /proc/x/r.safetensors", "--out /proc/x/r.safetensors cannot be written"),
    ("train --out {out}", "--out {out} is a folder; pass a file path"),
    ("train --out {d}/afile/r.safetensors", "{d}/afile is a file, not a folder"),
    ("train --out /dev/null", "--out /dev/null exists and is not a regular file"),
    ("train --out {out}/r.safetensors --checkpoint-dir {d}/afile", "--checkpoint-dir {d}/afile/checkpoint"),
    ("train --out {out}/r.safetensors --checkpoint-dir /proc/x", "--checkpoint-dir /proc/x/checkpoint.safetensors"),
    ("train --out {out}/r.safetensors --log-file {d}/afile/log", "--log-file {d}/afile/log cannot be created"),
    ("train --out {out}/r.safetensors --log-file {out}", "--log-file {out} is a folder"),
    ("train --out {out}/r.safetensors --resume", "--resume has no effect without --checkpoint-dir"),
    ("train --out {out}/r.safetensors --resume --checkpoint-dir {d}/empty_ckpt", "--resume: no checkpoint at"),
    ("train --out {out}/r.safetensors --resume --checkpoint-dir {d}/truncated_ckpt",
     "{d}/truncated_ckpt/checkpoint.safetensors: not a readable safetensors file"),
    ("train --out {out}/r.safetensors --resume --checkpoint-dir {d}/other_ckpt", "--resume: the checkpoint"),
    ("train --out {out}/r.safetensors --model {d}/nowhere", "no such directory"),
    ("train --out {out}/r.safetensors --model {d}/afile", "is a file; give a local diffusers"),
    ("train --out {out}/r.safetensors --model {unet}",
     "UNet2DConditionModel has no `transformer_blocks`; harmonica supports"),
    ("train --out {out}/r.safetensors --model {d}/unet_pipeline", "the pipeline has no transformer"),
    ("train --out {out}/r.safetensors --model {d}/no_weights", "no weights (*.safetensors or *.bin)"),
    ("train --out {out}/r.safetensors --model {dit} --prompt-embeds {d}/embeds.safetensors",
     "--prompt-embeds: DiTTransformer2DModel is class-conditioned and takes no prompt embeddings"),
    ("train --out {out}/r.safetensors --model {dit} --method l2c", "--method l2c needs real training images"),
    ("train --out {out}/r.safetensors --method l2c --scheduler euler", "--method l2c trains for DDIM only"),
    ("train --out {out}/r.safetensors --model {pixart}", "--prompt-embeds: PixArtTransformer2DModel is text-conditioned"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/embeds_width7.safetensors",
     "embeds have width 7 but PixArtTransformer2DModel expects text-encoder outputs of width 12"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/embeds_nan.safetensors",
     "PromptConditioning.embeds contains NaN"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/embeds_renamed.safetensors",
     "expected tensors 'embeds'"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/junk.safetensors",
     "--prompt-embeds {d}/junk.safetensors: cannot load --prompt-embeds"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/fifo.safetensors", "not a regular file"),
    ("train --out {out}/r.safetensors --model {pixart} --prompt-embeds {d}/missing.safetensors", "no file at"),
    # ---- sample
    ("sample --out {out} --scheduler heun", "argument --scheduler: invalid choice: 'heun'"),
    ("sample --out {out} --model {dit}", "--model: sample runs the bundled testbed"),
    ("sample --out {out} --steps 0", "--steps: must be an integer >= 1, got 0"),
    ("sample --out {out} --scheduler euler", "train a router with `harmonica train --scheduler euler --steps 20 --out"),
    ("sample --out {out} --steps 7", "there is no bundled router for these (bundled: --scheduler ddim --steps 20, --scheduler ddim --steps 50); pass one of those, or --schedule with a router file or a static schedule such as taylorseer:3:2"),
    ("sample --out {out} --guidance nan", "--guidance: must be a finite number >= 0, got nan"),
    ("sample --out {out} --seed -1", "--seed: must be an integer >= 0"),
    ("sample --out {out} --threshold 5", "--threshold: must be a finite number in [0, 1], got 5.0"),
    ("sample --out {out} --schedule {d}/fora20.safetensors --threshold 0.5", "--threshold applies to routers"),
    ("sample --out {out} --num-images -3", "--num-images: must be an integer >= 1, got -3"),
    ("sample --out {out} --rounds 0", "--rounds: must be an integer >= 1"),
    ("sample --out {out} --threads 0", "--threads: must be an integer >= 1"),
    ("sample --out {d}/afile", "--out {d}/afile is a file, not a folder"),
    ("sample --out {out} --schedule {d}/missing.safetensors", "--schedule: schedule/router file not found"),
    ("sample --out {out} --schedule {d}/junk.safetensors", "is neither a harmonica router nor a schedule"),
    ("sample --out {out} --schedule {d}/fifo.safetensors", "not a regular file"),
    ("sample --out {out} --schedule {d}/fora20x5.safetensors", "schedule has 5 blocks but the model has 8"),
    ("sample --out {out} --schedule {d}/fora10.safetensors --steps 20", "--steps 20 does not match --schedule"),
    ("sample --out {out} --schedule {d}/router20.safetensors --scheduler dpmsolver++",
     "schedule was trained at the timesteps of ddim (20 timesteps 950, 900, 850, 800, ...) but dpmsolver++"),
    # ---- evaluate
    ("evaluate --samples abc", "argument --samples: invalid int value: 'abc'"),
    ("evaluate --samples 1", "--samples: must be an integer >= 2, got 1"),
    ("evaluate --steps 0", "--steps: must be an integer >= 1, got 0"),
    ("evaluate --guidance -1", "--guidance: must be a finite number >= 0"),
    ("evaluate --seed -1", "--seed: must be an integer >= 0"),
    ("evaluate --batch-size 0", "--batch-size: must be an integer >= 1"),
    ("evaluate --timing-samples 0", "--timing-samples: must be an integer >= 1"),
    ("evaluate --samples 10 --timing-samples 20", "--timing-samples 20 is more than --samples 10"),
    ("evaluate --timing-repeats 0", "--timing-repeats: must be an integer >= 1, got 0"),
    ("evaluate --fewer-steps 0", "--fewer-steps: must be an integer >= 1, got 0"),
    ("evaluate --fewer-steps 20", "--fewer-steps must be below the table's 20 steps"),
    ("evaluate --threads 0", "--threads: must be an integer >= 1"),
    ("evaluate --router foo", "--router expects NAME=PATH"),
    ("evaluate --router a={d}/router20.safetensors --router a={d}/router20.safetensors", "--router a is given twice"),
    ("evaluate --router h={d}/missing.safetensors", "--router h: schedule/router file not found"),
    ("evaluate --router h={d}/fora20.safetensors", "--router h: {d}/fora20.safetensors is a schedule, not a router"),
    ("evaluate --router h={d}/router10.safetensors", "does not match --router h={d}/router10.safetensors, made for 10"),
    ("evaluate --dit-dir {d}/nowhere", "--dit-dir {d}/nowhere: config.json is missing"),
    ("evaluate --out {d}/afile", "--out {d}/afile is a file, not a folder"),
    # ---- evaluate --frontier
    ("evaluate --frontier --samples 1", "--samples: must be an integer >= 2, got 1"),
    ("evaluate --frontier --steps 0", "--steps: must be an integer >= 1, got 0"),
    ("evaluate --frontier --seeds 0,-1", "--seeds: must be an integer >= 0, got -1"),
    ("evaluate --frontier --seeds 3,3", "--seeds must be distinct seeds"),
    ("evaluate --frontier --seeds a", "argument --seeds: invalid _int_list value: 'a'"),
    ("evaluate --frontier --fewer-steps 10,0", "--fewer-steps: must be an integer >= 1, got 0"),
    ("evaluate --frontier --fewer-steps 25", "--fewer-steps must be below T = 20"),
    ("evaluate --frontier --fora 1", "--fora: must be an integer >= 2, got 1"),
    ("evaluate --frontier --taylorseer 1", "--taylorseer: must be an integer >= 2, got 1"),
    ("evaluate --frontier --orders 0", "--orders: must be an integer >= 1, got 0"),
    ("evaluate --frontier --orders 5", "--orders: forecast orders go up to 4, got 5"),
    ("evaluate --frontier --reference-seeds -1", "--reference-seeds: must be an integer >= 0"),
    ("evaluate --frontier --timing-rounds 0", "--timing-rounds: must be an integer >= 1"),
    ("evaluate --frontier --timing-samples 0", "--timing-samples: must be an integer >= 1"),
    ("evaluate --frontier --batch-size 0", "--batch-size: must be an integer >= 1"),
    ("evaluate --frontier --guidance nan", "--guidance: must be a finite number >= 0"),
    ("evaluate --frontier --no-timing --retime", "--no-timing and --retime contradict each other"),
    ("evaluate --frontier --png {out}/f.png", "--png has no effect without --plot"),
    ("evaluate --frontier --plot {d}", "--plot {d}: no frontier.json there"),
    ("evaluate --frontier --scheduler foo", "foo"),
    ("evaluate --frontier --router foo", "--router expects NAME=PATH"),
    ("evaluate --frontier --router h={d}/router10.safetensors", "does not match --router h={d}/router10.safetensors"),
    ("evaluate --frontier --dit-dir {d}/nowhere", "--dit-dir {d}/nowhere: config.json is missing"),
    ("evaluate --frontier --out {d}/afile", "--out {d}/afile is a file, not a folder"),
    ("evaluate --frontier --cache-dir {d}/afile", "--cache-dir {d}/afile is a file, not a folder"),
    ("evaluate --frontier --threads 0", "--threads: must be an integer >= 1"),
    # ---- plot
    ("plot {d}/missing.safetensors --out {out}/p.png", "schedule/router file not found"),
    ("plot {d}/junk.safetensors --out {out}/p.png", "is neither a harmonica router nor a schedule"),
    ("plot {d}/fora20.safetensors", "the following arguments are required: --out"),
    ("plot {d}/fora20.safetensors --out {out}/p.xyz", "--out {out}/p.xyz: the file name must end in an image format"),
    ("plot {d}/fora20.safetensors --out {d}/afile/p.png", "{d}/afile is a file, not a folder"),
    ("plot {d}/fora20.safetensors --out {out}/p.png --threshold 0.5", "--threshold applies to routers"),
    ("plot {d}/router20.safetensors --out {out}/p.png --threshold 2", "--threshold: must be a finite number in [0, 1]"),
    ("plot {d}/fora20.safetensors --out {out}/p.png --threads 2", "unrecognized arguments: --threads 2"),
    # ---- bench
    ("bench --shape dit-h", "argument --shape: invalid choice: 'dit-h'"),
    ("bench --steps 0", "--steps: must be an integer >= 1, got 0"),
    ("bench --batch 0", "--batch: must be an integer >= 1, got 0"),
    ("bench --rounds 0", "--rounds: must be an integer >= 1"),
    ("bench --threads 0", "--threads: must be an integer >= 1, got 0"),
    ("bench --threads -1", "--threads: must be an integer >= 1, got -1"),
    ("bench --threshold 0.5", "--threshold has no effect without --schedule"),
    ("bench --schedule {d}/missing.safetensors", "--schedule: schedule/router file not found"),
    ("bench --schedule {d}/fora20.safetensors", "schedule has 8 blocks but the model has 28"),
    ("bench --schedule {d}/junk.safetensors", "is neither a harmonica router nor a schedule"),
    ("bench --shape testbed --schedule {d}/fora20.safetensors --steps 10", "--steps 10 does not match --schedule"),
    ("bench --shape testbed --schedule {d}/fora20.safetensors --threshold 0.2", "--threshold applies to routers"),
    ("bench --schedule taylorseer:3", "--schedule taylorseer:3: expected taylorseer:INTERVAL:ORDER with whole numbers"),
    ("bench --schedule fora:2:1", "--schedule fora:2:1: expected fora:INTERVAL with whole numbers, e.g. fora:2"),
    ("bench --schedule fora:x", "expected fora:INTERVAL with whole numbers"),
    ("bench --schedule fora:1", "--schedule fora:1: the interval must be in [2, 9] for 10 steps"),
    ("bench --steps 6 --schedule taylorseer:6:2", "the interval must be in [2, 5] for 6 steps"),
    ("bench --schedule taylorseer:3:9", "--schedule taylorseer:3:9: the order must be in [0, 4] (0 = reuse), got 9"),
    ("bench --schedule fora:2 --threshold 0.2", "--threshold applies to routers"),
    ("sample --out {out} --schedule taylorseer:-3:2", "expected taylorseer:INTERVAL:ORDER with whole numbers"),
    ("sample --out {out} --schedule fora:20", "the interval must be in [2, 19] for 20 steps"),
    # ---- no command, unknown command
    ("", "the following arguments are required: COMMAND"),
    ("serve", "invalid choice: 'serve'"),
]


@pytest.mark.parametrize("line, expected", CASES, ids=[c[0].replace(" ", "_")[:60] or "empty" for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(line, expected, data, tmp_path, capsys, monkeypatch, no_work):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # default output folders (outputs/demo, ...) land here
    argv = line.format(out=out, **data).split()
    data_root = Path(data["d"])
    before = snapshot(tmp_path, data_root)
    code, stdout, stderr = run_cli(argv, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert expected.format(out=out, **data) in lines[0], lines[0]
    assert stdout == ""
    assert snapshot(tmp_path, data_root) == before  # nothing written, not even an empty folder


@pytest.mark.parametrize("module, command", [("compare", ["evaluate"]), ("frontier", ["evaluate", "--frontier"])])
def test_python_m_module_is_the_harmonica_command(module, command, capsys, no_work, captured):
    main = getattr(harmonica, module).main
    code, stdout, stderr = run_cli([*command, "--samples", "1"], capsys)
    assert (main(["--samples", "1"]), *capsys.readouterr()) == (code, stdout, stderr) \
        and code == 2 and "--samples: must be an integer >= 2, got 1" in stderr
    assert main(["--samples", "8", "--steps", "10", "--fewer-steps", "5"]) == 0
    args = captured["args"]
    assert (args.samples, args.steps, args.fewer_steps) == (8, 10, [5] if module == "frontier" else 5)


# ---------------------------------------------------------------------------------------------- flags act


class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch, no_work):
    """Replace every command's work by recording the checked arguments (and the torch threads)."""
    seen = {}

    def record(args):
        seen["args"], seen["threads"] = args, torch.get_num_threads()
        return 0

    for name in ("cmd_demo", "cmd_sample", "cmd_evaluate", "cmd_frontier", "cmd_bench", "cmd_plot"):
        monkeypatch.setattr(cli, name, record)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def test_train_uses_every_option_and_writes_the_router(tmp_path, capsys, monkeypatch, no_work):
    seen = {}

    def train(transformer, args):
        seen["config"], seen["scheduler"] = args.train_config, args.train_scheduler
        return Router.init(args.train_config.num_steps, 8, metadata={"achieved_cur": 0.25})

    monkeypatch.setattr(cli, "_load_weights", lambda spec: "the testbed weights")
    monkeypatch.setattr(cli, "_train", train)
    out = tmp_path / "new" / "r.safetensors"
    code, stdout, stderr = run_cli(["train", "--out", str(out), "--guidance", "7", "--steps", "12", "--seed", "3",
                                    "--iterations", "9", "--batch-size", "2", "--target-speedup", "1.4",
                                    "--scheduler", "euler", "--log-file", str(tmp_path / "log.jsonl"), "-q"], capsys)
    assert code == 0, stderr
    config = seen["config"]
    assert (config.guidance_scale, config.num_steps, config.seed, config.iterations, config.batch_size,
            config.target_speedup) == (7.0, 12, 3, 9, 2, 1.4)
    assert config.progress is False  # -q
    from harmonica.testbed.routers import RECIPE

    assert (config.beta, config.iepo_refresh) == (RECIPE["beta"], RECIPE["iepo_refresh"])  # as the demo's router
    assert config.log_file == str(tmp_path / "log.jsonl")
    assert type(seen["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert Router.load(out).num_steps == 12 and f"wrote {out}" in stdout


def test_train_from_taylorseer_starts_from_its_schedule_at_its_speed(tmp_path, capsys, monkeypatch, no_work):
    from harmonica.train.trainer import training_cost

    seen = {}

    def train(transformer, args):
        seen["config"] = args.train_config
        return Router.init(args.train_config.num_steps, 8)

    monkeypatch.setattr(cli, "_load_weights", lambda spec: "the testbed weights")
    monkeypatch.setattr(cli, "_train", train)
    code, _, stderr = run_cli(["train", "--out", str(tmp_path / "r.safetensors"), "--steps", "10",
                               "--forecast-order", "2", "--init-taylorseer", "3", "-q"], capsys)
    assert code == 0, stderr
    config, start = seen["config"], Schedule.taylorseer(10, 8, 3, order=2)
    assert config.init_router.to_schedule(config.threshold) == start and config.forecast_order == 2
    assert config.keep_threshold and config.history_grad and config.iepo_variant == "sensitivity"
    from diffusers import DiTTransformer2DModel

    structure = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(DIT_DIR))
    assert config.target_speedup == start.theoretical_speedup(training_cost(structure, config))


def test_sample_threshold_applies_to_the_best_bundled_router(capsys, tmp_path, captured):
    from harmonica.testbed.routers import load_router

    code, _, stderr = run_cli(["sample", "--out", str(tmp_path), "--threshold", "0.9"], capsys)
    assert code == 0, stderr
    plan = captured["args"].plan
    assert plan.metadata["threshold"] == 0.9
    assert plan == load_router("harmonica-o2-ts3", "ddim", 20).to_schedule(0.9)


@pytest.mark.parametrize("command", ["sample", "demo"])
def test_sample_and_demo_default_to_the_best_bundled_router_of_their_steps(command, capsys, tmp_path, captured):
    from harmonica.testbed.routers import load_router

    code, _, stderr = run_cli([command, "--out", str(tmp_path), "--steps", "50"], capsys)
    assert code == 0, stderr
    args = captured["args"]
    plan = args.plan if command == "sample" else args.router.to_schedule()
    assert plan == load_router("harmonica-o2-ts4", "ddim", 50).to_schedule()


def test_a_plan_for_another_sampler_family_on_the_same_grid_warns_in_one_line(capsys, tmp_path, captured, data):
    # The testbed's noise schedule uses "leading" spacing, which DDIM and Euler share: the grid matches.
    code, _, stderr = run_cli(["sample", "--out", str(tmp_path), "--schedule", f"{data['d']}/router20.safetensors",
                               "--scheduler", "euler"], capsys)
    assert code == 0
    assert stderr.strip().splitlines() == ["harmonica: warning: this schedule was trained for the ddim sampler but "
                                           "runs with euler: the steps it caches were chosen at ddim's noise "
                                           "levels, so image quality may suffer; train a schedule for euler"]


@pytest.mark.parametrize("line, threads", [
    ("bench --shape testbed", cli.TESTBED_THREADS),
    ("bench --shape testbed --threads 2", 2),
    ("sample --out {out}", cli.TESTBED_THREADS),
    ("sample --out {out} --threads 2", 2),
    ("evaluate", cli.TESTBED_THREADS),
    ("evaluate --frontier --threads 2", 2),
    ("evaluate --frontier", cli.TESTBED_THREADS),
    ("demo --threads 2 --out {out}", 2),
])
def test_threads_default_on_the_testbed_and_follow_the_option(line, threads, capsys, tmp_path, captured):
    torch.set_num_threads(3)
    code, _, stderr = run_cli(line.format(out=tmp_path).split(), capsys)
    assert code == 0, stderr
    assert captured["threads"] == threads


def test_threads_keep_torchs_default_for_other_models(capsys, captured):
    torch.set_num_threads(3)
    code, _, stderr = run_cli(["bench", "--shape", "dit-b"], capsys)
    assert code == 0, stderr
    assert captured["threads"] == 3


@pytest.mark.parametrize("argv, expected", [
    ("sample --schedule taylorseer:3:2", lambda: Schedule.taylorseer(20, 8, 3, order=2)),
    ("sample --steps 10 --schedule fora:2", lambda: Schedule.fora(10, 8, 2)),
    ("bench --schedule taylorseer:4:1 --steps 12", lambda: Schedule.taylorseer(12, 28, 4, order=1)),
    ("bench --shape testbed --schedule fora:3", lambda: Schedule.fora(10, 8, 3)),
])
def test_a_static_schedule_by_name(argv, expected, capsys, captured, tmp_path):
    code, _, stderr = run_cli([*argv.split(), *(["--out", str(tmp_path)] if argv.startswith("sample") else [])], capsys)
    assert code == 0, stderr
    assert captured["args"].plan == expected()


def test_the_frontier_takes_schedule_files_as_rows_and_the_comparison_router_files_only(capsys, captured, data):
    from harmonica.testbed.routers import load_router_specs

    path = f"{data['d']}/fora20.safetensors"
    code, _, stderr = run_cli(["evaluate", "--frontier", "--router", f"mine={path}"], capsys)
    assert code == 0, stderr
    assert load_router_specs(captured["args"].router) == {"mine": Schedule.load(path)}
    code, _, stderr = run_cli(["evaluate", "--router", f"mine={path}"], capsys)
    assert code == 2 and "the comparison takes router files (the frontier" in stderr


def test_bench_steps_default_to_the_schedules(capsys, captured, data):
    code, _, stderr = run_cli(["bench", "--shape", "testbed", "--schedule", f"{data['d']}/fora10.safetensors"], capsys)
    assert code == 0, stderr
    assert captured["args"].steps == 10 and captured["args"].plan.num_steps == 10


def test_a_failure_during_the_work_is_exit_1_in_one_line(capsys, tmp_path, monkeypatch):
    def broken(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "cmd_plot", broken)
    Schedule.fora(4, 2).save(tmp_path / "s.safetensors")
    code, _, stderr = run_cli(["plot", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 1
    assert stderr.strip().splitlines() == ["harmonica: failed: RuntimeError: disk on fire second line"]


def test_debug_shows_the_traceback_instead_of_one_line(capsys):
    with pytest.raises(cli.UsageError, match="--batch: must be an integer >= 1, got 0"):
        cli.main(["bench", "--batch", "0", "--debug"])

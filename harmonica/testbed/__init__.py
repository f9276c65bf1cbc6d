"""The bundled testbed: a small class-conditional DiT trained on Fashion-MNIST, and its FID classifier.

    import harmonica.testbed as tb
    bed = tb.load()                                   # frozen diffusers DiTTransformer2DModel + metadata
    images = tb.generate(bed, labels=torch.arange(10), seed=0)   # (10, 1, 28, 28) in [-1, 1]

Defaults (DDIM, 20 steps, guidance DEFAULT_GUIDANCE) are the settings the model card reports and that
router training is measured on. Weights, training data and metrics: assets/MODEL_CARD.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import CLASS_NAMES, NUM_CLASSES

__all__ = [
    "ASSETS_DIR", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "DEFAULT_SAMPLER", "CLASS_NAMES", "NUM_CLASSES",
    "NULL_CLASS", "Testbed", "load", "generate", "load_router",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DIT_DIR = ASSETS_DIR / "dit"

DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "ddim"
# The guidance sweep in assets/MODEL_CARD.md (500 samples, DDIM 20): FID-FMNIST is lowest at 3
# (4.46, against 6.22 at 2 and 4.67 at 4), with accuracy 0.89; higher scales buy accuracy with FID.
DEFAULT_GUIDANCE = 3.0
NULL_CLASS = NUM_CLASSES


@dataclass
class Testbed:
    transformer: torch.nn.Module          # diffusers DiTTransformer2DModel, eval mode, frozen
    scheduler_config: dict                # DDPMScheduler config of the training noise schedule
    class_names: tuple[str, ...]
    null_class: int                       # label id of the unconditional (CFG) embedding
    image_size: int
    in_channels: int

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def make_scheduler(self, name: str = DEFAULT_SAMPLER):
        from ..sampling import make_scheduler

        return make_scheduler(name, self.scheduler_config)

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise ``(n, C, H, W)``, drawn on the CPU so a seed gives the same noise on any device."""
        shape = (n, self.in_channels, self.image_size, self.image_size)
        return torch.randn(shape, generator=generator).to(device=self.device, dtype=self.dtype)


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, dit_dir=None) -> Testbed:
    """The bundled testbed DiT (weights stored fp16, cast to ``dtype``) with its scheduler config.

    ``dit_dir``: another exported testbed DiT directory (e.g. a checkpoint of a training run exported
    with ``harmonica.testbed.train``) instead of the bundled one.
    """
    from diffusers import DiTTransformer2DModel

    directory = Path(dit_dir) if dit_dir is not None else DIT_DIR
    weights = directory / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing; train and export it with "
                                f"`python -m harmonica.testbed.train --what dit --export`")
    # low_cpu_mem_usage=False: the default wants `accelerate` and prints a warning without it (6 MB model).
    transformer = DiTTransformer2DModel.from_pretrained(directory, torch_dtype=dtype, low_cpu_mem_usage=False)
    transformer.to(device).eval().requires_grad_(False)
    config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    embedder = transformer.transformer_blocks[0].norm1.emb.class_embedder
    # The null row exists only if the label table has one row beyond the classes; check rather than
    # trust the constant, since CFG with a missing row would index out of the table.
    if embedder.embedding_table.num_embeddings != embedder.num_classes + 1 or embedder.num_classes != NUM_CLASSES:
        raise ValueError(f"bundled DiT has a label table of {embedder.embedding_table.num_embeddings} rows for "
                         f"{embedder.num_classes} classes; expected {NUM_CLASSES} + 1 (null)")
    return Testbed(
        transformer=transformer,
        scheduler_config=config,
        class_names=CLASS_NAMES,
        null_class=embedder.num_classes,
        image_size=transformer.config.sample_size,
        in_channels=transformer.config.in_channels,
    )


def generate(
    bed: Testbed,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    sampler: str = DEFAULT_SAMPLER,
    batch_size: int = 250,
    transformer: torch.nn.Module | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one image per label with :func:`harmonica.sampling.sample`; returns ``(N, 1, 28, 28)``
    float32 on the CPU, in [-1, 1].

    The noise depends only on ``seed`` and the position in ``labels`` (batch k uses the generator
    seeded with ``seed + k``), so a cached ``transformer`` run with the same arguments starts from
    exactly the noise of the uncached run it is compared with.
    """
    from ..sampling import sample

    model = transformer if transformer is not None else bed.transformer
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = []
    for k, i in enumerate(range(0, labels.shape[0], batch_size)):
        y = labels[i:i + batch_size].to(bed.device)
        gen = torch.Generator().manual_seed(seed + k)
        latents = bed.latents(y.shape[0], gen)
        scheduler = bed.make_scheduler(sampler)
        x0 = sample(model, scheduler, latents, num_inference_steps=num_inference_steps,
                    cond={"class_labels": y}, uncond={"class_labels": torch.full_like(y, bed.null_class)},
                    guidance_scale=guidance_scale, generator=gen, progress=progress)
        out.append(x0.float().cpu().clamp(-1, 1))
    return torch.cat(out)


# Bundled routers (HarmoniCa, L2C) for this model; imported last, as routers.py builds on the names above.
from .routers import load_router  # noqa: E402

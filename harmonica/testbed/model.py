"""The testbed DiT: diffusers' own ``DiTTransformer2DModel``, sized for CPU training on Fashion-MNIST.

Using the stock diffusers class (not a look-alike) means the cache adapter is exercised on exactly the
module tree and forward that DiT-XL/2 users run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from diffusers import DDPMScheduler, DiTTransformer2DModel

from .data import IMAGE_SIZE, NUM_CLASSES

# 28x28 with 4x4 patches gives a 7x7 = 49-token sequence: no padding, and short enough that a
# 8-block, 128-wide model trains within the time budget on two shared CPU cores.
DIT_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    patch_size=4,
    in_channels=1,
    out_channels=1,          # eps prediction only, no learned sigma
    num_layers=8,
    num_attention_heads=4,
    attention_head_dim=32,   # width 128
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_elementwise_affine=False,
    dropout=0.0,
)

# Candidate shapes for the testbed, by name: overrides of DIT_CONFIG. What each costs (CPU sampling,
# GPU training, file size) is measured by `python -m harmonica.testbed.sizing`; the choice and the
# numbers are in assets/MODEL_CARD.md. "Toward DiT-XL/2" means more blocks (it has 28) or more tokens
# (it has 256); both cost CPU time in every demo, test and router-training run.
ARCHITECTURES = {
    "L8-d128-p4": {},                                                     # 49 tokens, 16 cache units
    "L12-d128-p4": dict(num_layers=12),                                   # 49 tokens, 24 units
    "L12-d96-p4": dict(num_layers=12, num_attention_heads=3),             # 49 tokens, 24 units
    "L8-d64-p2": dict(patch_size=2, num_attention_heads=2),               # 196 tokens, 16 units
    "L8-d128-p2": dict(patch_size=2),                                     # 196 tokens, 16 units
}
DEFAULT_ARCHITECTURE = "L8-d128-p4"


def architecture_config(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown testbed architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return {**DIT_CONFIG, **ARCHITECTURES[name]}


# CombinedTimestepLabelEmbeddings always builds its LabelEmbedding with class_dropout_prob=0.1, which
# appends one "dropped" row after the real classes: the null (unconditional) id is therefore NUM_CLASSES.
NULL_CLASS = NUM_CLASSES

# The DiT / ADM training schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    variance_type="fixed_small",
    # No x_0 clipping, as for DiT. Measured here (step-1.9k weights, 100 samples, DDIM 20, guidance 3):
    # diffusers' DDIM clips x_0 but keeps the unclipped eps for the direction term, and with CFG's
    # large eps that inconsistency left 4x4 patch artifacts: accuracy 0.32 / FID 40.8 with clipping
    # against 0.72 / 16.9 without.
    clip_sample=False,
)


def build_dit(config: dict | None = None) -> DiTTransformer2DModel:
    """A freshly initialised testbed DiT, with DiT's initialisation (the diffusers class keeps the
    PyTorch defaults, under which adaLN-Zero is not zero and training starts noticeably slower)."""
    model = DiTTransformer2DModel(**(config or DIT_CONFIG))
    dit_initialise(model)
    return model


@torch.no_grad()
def dit_initialise(model: DiTTransformer2DModel) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity map.
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    nn.init.zeros_(model.proj_out_1.weight)
    nn.init.zeros_(model.proj_out_1.bias)
    nn.init.zeros_(model.proj_out_2.weight)
    nn.init.zeros_(model.proj_out_2.bias)


def null_class_of(model: DiTTransformer2DModel) -> int:
    """The label id the model was trained to treat as "no class", read off its embedding table."""
    embedder = model.transformer_blocks[0].norm1.emb.class_embedder
    rows = embedder.embedding_table.num_embeddings
    if rows != embedder.num_classes + 1:
        raise ValueError(f"label table has {rows} rows for {embedder.num_classes} classes: no null row")
    return embedder.num_classes


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def ema_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema

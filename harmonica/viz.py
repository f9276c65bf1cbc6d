"""Plots: schedule / router heatmaps and image grids (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .schedule import Router, Schedule


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(
    schedule_or_router: Schedule | Router,
    path: str | Path,
    *,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap (steps x blocks) for the attn and mlp branches, plus the cache usage per step.

    A Router is drawn as its weights sigmoid(logits) with the schedule it gives at ``threshold``
    (default: the one it was trained to) outlined; a Schedule as its compute mask (1 = compute, 0 = reuse the cache).
    """
    plt = _pyplot()
    if isinstance(schedule_or_router, Router):
        with torch.no_grad():
            values = schedule_or_router.weights().detach().float().cpu()
        schedule = schedule_or_router.to_schedule(threshold)
        value_label = "router weight sigmoid(logit)"
    elif isinstance(schedule_or_router, Schedule):
        schedule = schedule_or_router
        values = schedule.mask.float()
        value_label = "1 = compute, 0 = reuse cache"
    else:
        raise TypeError(f"expected a harmonica Schedule or Router, got {type(schedule_or_router).__name__}")

    steps, blocks = schedule.num_steps, schedule.num_blocks
    mask = schedule.mask
    reused_per_step = 1.0 - mask.float().mean(dim=(1, 2))
    fig, axes = plt.subplots(
        1, 3, figsize=(4 + 0.35 * blocks * 2 + 2.5, 1.5 + 0.28 * steps),
        gridspec_kw={"width_ratios": [blocks, blocks, max(3, blocks // 3)]}, constrained_layout=True,
    )
    image = None
    for ax, branch, name in ((axes[0], 0, "attn"), (axes[1], 1, "mlp")):
        image = ax.imshow(values[:, :, branch].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        reused = (~mask[:, :, branch]).nonzero()
        if len(reused):  # mark every reused unit so the plan is readable even for a router
            ax.scatter(reused[:, 1], reused[:, 0], marker="x", s=18, color="red", linewidths=1)
        ax.set_title(f"{name} branch")
        ax.set_xlabel("block index")
        ax.set_ylabel("model evaluation (step 0 = noisiest)")
        ax.set_xticks(range(0, blocks, max(1, blocks // 8)))
        ax.set_yticks(range(0, steps, max(1, steps // 10)))
    cbar = fig.colorbar(image, ax=axes[:2], shrink=0.9)
    cbar.set_label(value_label)
    axes[2].barh(range(steps), reused_per_step.numpy() * 100, color="tab:orange")
    axes[2].set_ylim(steps - 0.5, -0.5)
    axes[2].set_xlim(0, 100)
    axes[2].set_xlabel("cache usage (%)")
    axes[2].set_title("CUR per step")
    axes[2].set_yticks(range(0, steps, max(1, steps // 10)))
    heading = title or f"{type(schedule_or_router).__name__}: {steps} steps x {blocks} blocks"
    fig.suptitle(f"{heading}  (CUR {schedule.cache_usage:.1%}; x = reused from cache)")
    return save_figure(fig, path, tight=False)


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One row of images per tensor (B, C, H, W) in [-1, 1], e.g. uncached vs cached from the same noise."""
    plt = _pyplot()
    if not rows:
        raise ValueError("rows must contain at least one batch of images")
    columns = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 1.2, 1.2 * len(rows) + 0.6), squeeze=False)
    for r, images in enumerate(rows):
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        for c in range(columns):
            ax = axes[r][c]
            image = images[c].numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if r == 0 and column_labels:
                ax.set_title(column_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def save_figure(fig, path, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (folders created, format from the suffix) and close it: every plot of
    the package goes out this way, at one resolution."""
    plt = _pyplot()
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

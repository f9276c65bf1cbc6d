"""Training curves of testbed DiT runs (the ``curves.json`` that ``harmonica.testbed.train`` writes)::

    python -m harmonica.testbed.curves runs/testbed/dit/curves.json --png curves.png
    python -m harmonica.testbed.curves a/dit_X_curves.json b/dit_Y_curves.json      # summary table only

Each file is one run; several are drawn on the same axes, labelled by architecture, batch and lr.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Panels: (key in an evaluation row, y-axis label). The training loss panel comes first.
EVAL_PANELS = (
    ("test_loss", "held-out denoising MSE (test images)"),
    ("fid_fmnist", "FID-FMNIST (lower is better)"),
    ("strict_accuracy_rel", "accuracy / classifier's test accuracy"),
    ("precision", "precision and recall (k = 3)"),
)


def load(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    for key in ("args", "train", "evals"):
        if key not in doc:
            raise ValueError(f"{path} is not a testbed training curves file (no {key!r})")
    return doc


def run_label(doc: dict) -> str:
    a = doc["args"]
    return f"{a['arch']}, batch {a['batch_size']}, lr {a['lr']:g}"


def summary(docs: list[dict]) -> str:
    """A markdown table: one row per run, at its best evaluation (lowest FID-FMNIST)."""
    lines = ["| run | device | steps | steps/s | best step | test loss | FID-FMNIST | accuracy (rel) | "
             "strict accuracy (rel) | precision | recall |", "|" + "---|" * 11]
    for doc in docs:
        evals, train = doc["evals"], doc["train"]
        # The last record of either kind (a short run may end before its first training-log line).
        last = max(train[-1:] + evals[-1:], key=lambda r: r["step"], default={"step": 0, "train_wall_s": 0})
        steps = last["step"]
        rate = steps / last["train_wall_s"] if last["train_wall_s"] else float("nan")
        if not evals:
            lines.append(f"| {run_label(doc)} | {doc['device']} | {steps} | {rate:.1f} |" + " - |" * 7)
            continue
        b = min(evals, key=lambda e: e["fid_fmnist"])
        strict = (f"{b['strict_accuracy']:.3f} ({b['strict_accuracy_rel']:.3f})" if "strict_accuracy" in b else "-")
        lines.append(f"| {run_label(doc)} | {doc['device']} | {steps} | {rate:.1f} | {b['step']} | {b['test_loss']:.5f} | "
                     f"{b['fid_fmnist']:.3f} | {b['accuracy']:.3f} ({b['accuracy_rel']:.3f}) | {strict} | "
                     f"{b.get('precision', float('nan')):.3f} | {b.get('recall', float('nan')):.3f} |")
    for doc in docs:
        sweep = doc.get("guidance_sweep")
        if sweep:
            lines.append(f"\nGuidance sweep, {run_label(doc)} ({sweep['weights']} weights):")
            for g, row in sweep["rows"].items():
                lines.append(f"  guidance {g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "num_samples"))
    return "\n".join(lines)


def plot(docs: list[dict], path: str | Path, title: str = "", baseline: dict | None = None,
         baseline_label: str = "start", xlabel: str = "optimiser step") -> Path:
    """One panel of training loss and one per held-out measure, runs overlaid. ``baseline``: an
    evaluation row of the starting weights (e.g. those a run was initialised from), drawn in black
    at its ``step``."""
    from ..viz import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(EVAL_PANELS), figsize=(4.2 * (1 + len(EVAL_PANELS)), 3.6))
    for i, doc in enumerate(docs):
        colour, label = f"C{i}", run_label(doc)
        steps = [r["step"] for r in doc["train"]]
        axes[0].plot(steps, [r["loss"] for r in doc["train"]], color=colour, lw=0.8, label=label)
        evals = doc["evals"]
        x = [e["step"] for e in evals]
        for ax, (key, _) in zip(axes[1:], EVAL_PANELS):
            if evals and key in evals[0]:
                ax.plot(x, [e[key] for e in evals], "o-", color=colour, ms=3, label=label)
        if evals and "accuracy_rel" in evals[0]:
            axes[3].plot(x, [e["accuracy_rel"] for e in evals], "s--", color=colour, ms=3, alpha=0.6)
        if evals and "recall" in evals[0]:
            axes[4].plot(x, [e["recall"] for e in evals], "s--", color=colour, ms=3, alpha=0.6)
        best = [e for e in evals if e.get("best")]
        if best:
            b = min(best, key=lambda e: e["fid_fmnist"])
            axes[2].plot([b["step"]], [b["fid_fmnist"]], "*", color=colour, ms=12)
    if baseline is not None:
        for ax, (key, _) in zip(axes[1:], EVAL_PANELS):
            if key in baseline:
                ax.plot([baseline["step"]], [baseline[key]], "kx", ms=8, mew=2, label=baseline_label)
        if "accuracy_rel" in baseline:
            axes[3].plot([baseline["step"]], [baseline["accuracy_rel"]], "kx", ms=8, mew=2, alpha=0.5)
        if "recall" in baseline:
            axes[4].plot([baseline["step"]], [baseline["recall"]], "kx", ms=8, mew=2, alpha=0.5)
        axes[1].legend(fontsize=7)
    axes[0].set_ylabel("training loss (batch MSE, mean per log interval)")
    axes[0].set_yscale("log")
    for ax, (key, ylabel) in zip(axes[1:], EVAL_PANELS):
        ax.set_ylabel(ylabel)
    axes[2].set_yscale("log")
    axes[3].axhline(0.93, color="grey", lw=0.8, ls=":")
    axes[3].text(0.02, 0.93, " 0.93", color="grey", va="bottom", transform=axes[3].get_yaxis_transform())
    axes[3].set_title("strict (solid), FID classifier (dashed)", fontsize=9)
    axes[4].set_title("precision (solid), recall (dashed)", fontsize=9)
    axes[2].set_title("star: selected weights", fontsize=9)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m harmonica.testbed.curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("curves", nargs="+", help="curves JSON files")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--title", default="")
    p.add_argument("--baseline", default=None, help="JSON file with one evaluation row of the starting weights")
    p.add_argument("--baseline-label", default="start")
    p.add_argument("--xlabel", default="optimiser step")
    args = p.parse_args(argv)
    docs = [load(c) for c in args.curves]
    text = summary(docs)
    print(text)
    if args.png:
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        print(f"wrote {plot(docs, args.png, args.title, baseline, args.baseline_label, args.xlabel)}")
    return text


if __name__ == "__main__":
    main()

"""`make demo`: the same CIFAR ResNet-20 budget with no block, SE, GC and NL, then one comparison table.

Each variant trains from the same seed on the same CIFAR-10 subset (configs/demo_cifar10.yaml) and
is scored on held-out test images; the table lists test accuracy, parameters, multiply-adds and
training throughput, and `curves.png` overlays the validation curves.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gcnet.builder import build_model, train
from gcnet.config import apply_overrides, config_from_dict, data_root, read_config_data
from gcnet.engine.metrics import count_flops, count_parameters, read_csv

DEMO_CONFIG = "demo_cifar10"

# name -> model section keys: GC and SE r4 in every block (stages 2-3 have 32 and 64 channels); NL as
# one block after the second residual block of stages 2 (16x16) and 3 (8x8), where maps are small.
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "se": {"context": {"block": "se", "reduction": 4}},
    "gc": {"context": {"block": "gc", "reduction": 4}},
    "nl": {"nonlocal_blocks": {"indices": [[], [1], [1]]}},
}


def variant_overrides(name: str) -> list[str]:
    """`--set` strings that turn the base config into the variant `name`."""
    return [f"model.{key}={json.dumps(value)}" for key, value in VARIANTS[name].items()]


def run(out: Path, data: str | None, epochs: int | None, train_per_class: int | None) -> int:
    """Train every variant and print the table; returns the exit status."""
    root = Path(data) if data is not None else data_root() / "cifar10"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(f"CIFAR-10 ImageFolder not found at {root}; expected {root}/train and {root}/test "
                         "(pass --data)")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for name in VARIANTS:
        base = read_config_data(DEMO_CONFIG)
        overrides = [f"data.train={root / 'train'}", f"data.test={root / 'test'}", f"train.out_dir={out / name}",
                     *variant_overrides(name)]
        if epochs is not None:
            overrides.append(f"train.epochs={epochs}")
        if train_per_class is not None:
            overrides.append(f"data.train_per_class={train_per_class}")
        config = config_from_dict(apply_overrides(base, overrides))
        shutil.rmtree(out / name, ignore_errors=True)  # the demo always starts fresh
        print(f"== {name}: {config.model.name} {VARIANTS[name] or 'no block'}", flush=True)
        result = train(config)
        probe = build_model(config)
        rows.append({
            "block": name,
            "test_top1": result.test["top1"] if result.test else float("nan"),
            "test_top5": result.test["top5"] if result.test else float("nan"),
            "params": count_parameters(probe),
            "macs": count_flops(probe, torch.randn(1, 3, config.data.image_size, config.data.image_size)),
            "images_per_s": result.images_per_s,
            "minutes": result.seconds / 60,
            "epochs": config.train.epochs,
        })
    table = format_table(rows, config.train.epochs, config.data.train_per_class, config.data.eval_per_class,
                         config.data.val_fraction, config.train.threads)
    print()
    print(table)
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; curves: {out / 'curves.png'}")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_comparison(out, list(VARIANTS))
    return 0


def format_table(rows: list[dict[str, Any]], epochs: int, train_per_class: int | None,
                 eval_per_class: int | None, val_fraction: float, threads: int | None) -> str:
    """Markdown table of the demo results."""
    lines = [
        f"CIFAR ResNet-20, {epochs} epochs on {train_per_class} train images/class "
        f"({val_fraction:.0%} held out for val), test on {eval_per_class} images/class, {threads} CPU threads",
        "",
        "| block | test top-1 (%) | test top-5 (%) | params | MMACs | train images/s | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['block']} | {r['test_top1']:.2f} | {r['test_top5']:.2f} | {r['params']:,} | "
                     f"{r['macs'] / 1e6:.2f} | {r['images_per_s']:.0f} | {r['minutes']:.2f} |")
    return "\n".join(lines)


def plot_comparison(out: Path, names: list[str]) -> Path:
    """Validation top-1 and training loss of every variant against epoch, in out/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        rows = read_csv(out / name / "metrics.csv")
        epochs = [int(r["epoch"]) for r in rows]
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label=name)
        ax_acc.plot([int(r["epoch"]) for r in rows if r["val_top1"]],
                    [float(r["val_top1"]) for r in rows if r["val_top1"]], marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Top-k accuracy, CSV and TensorBoard logs, and the loss/accuracy curves PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gcnet.engine.checkpoint import atomic_write


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top k scores, for each k (k capped at the classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top.eq(target.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


class CsvLog:
    """Append rows to a CSV file with a fixed header; rows past a resumed step are dropped first.

    The kept rows are rewritten to a temporary file that replaces the log atomically, so a kill
    during the rewrite leaves the old log whole.
    """

    def __init__(self, path: str | Path, fields: list[str], keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.fields = fields
        rows: list[dict[str, str]] = []
        if keep_until_step is not None and self.path.is_file():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= keep_until_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)
        self._handle = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=fields)

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: row.get(k, "") for k in self.fields})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_curves(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Loss (train, val) and top-1 (train, val) against epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(metrics_csv)

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(float(r["epoch"]), float(r[key])) for r in rows if r.get(key)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ax_loss.plot(*series(key), marker="o", label=label)
    for key, label in (("train_top1", "train"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        ax_acc.plot(*series(key), marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_step_losses(steps_csv: str | Path, out_png: str | Path, columns: tuple[str, ...], title: str = "") -> Path | None:
    """The loss (and its named terms) against the step, log scale, from steps.csv; None without steps."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(steps_csv) if Path(steps_csv).is_file() else []
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for name in columns:
        values = [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(steps, values, label=name, linewidth=2.0 if name == "loss" else 1.0)
    ax.set(xlabel="step", ylabel="loss", yscale="log" if all(float(r["loss"]) > 0 for r in rows) else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    out_png = Path(out_png)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


class TensorBoardLog:
    """Scalars to TensorBoard event files; raises a clear error when tensorboard is not installed."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ValueError("train.tensorboard is true but the tensorboard package is not installed; "
                             "pip install tensorboard or set train.tensorboard=false") from error
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: torch.nn.Module, example: Tensor) -> int:
    """Multiply-adds of one forward pass on `example` (batch 1), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs

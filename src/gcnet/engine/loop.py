"""The training loop of every task: one process or many under torchrun, resumable to the exact same losses.

    for epoch: for global batch: for micro-batch of this process (accumulation):
                   RNG seeded by (seed, step, micro-batch) -> task.loss -> backward
               all-reduce loss -> stop if non-finite -> clip -> step -> lr step [-> checkpoint]
               [validate] -> checkpoint last (and best) -> metrics.csv row
    end: test split, task outputs, curves, summary.json

A micro-batch's samples, augmentation and the model's own randomness (dropout, RoI sampling)
depend only on the seed, the step and the micro-batch's index in the global batch, so two processes
reproduce one process that accumulates two micro-batches, and a resumed run its uninterrupted self.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from gcnet._machine import preloaded_allocator, retain_freed_memory
from gcnet.blocks import NonLocal, describe_onednn_products
from gcnet.config import Config, ConfigError, config_from_dict
from gcnet.data.sampling import MicroBatchSampler, SeededDataset
from gcnet.engine import distributed
from gcnet.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gcnet.engine.metrics import CsvLog, TensorBoardLog, count_parameters, plot_curves, plot_step_losses
from gcnet.engine.task import Task

logger = logging.getLogger("gcnet.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is untouched."""


@dataclass
class RunParts:
    """What the builder makes of a config for the loop: the task, its sampler, optimizer and schedule."""

    task: Task
    sampler: MicroBatchSampler
    loader: DataLoader
    train_set: SeededDataset
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class TrainResult:
    """What a `train` call did: losses of each step it ran, last metrics, where things are."""

    out_dir: Path
    step_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    best_score: float | None = None
    images_per_s: float = 0.0
    seconds: float = 0.0
    parameters: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        """Mean seconds per step, the first (warm-up) one left out when there are more."""
        times = self.step_seconds[1:] or self.step_seconds
        return sum(times) / len(times) if times else 0.0


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """Seed of the model's randomness in micro-batch `index` of optimizer step `step`."""
    return (seed * 1_000_003 + step * 998_244_353 + index * 2_654_435_761 + 12_345) % (2**63)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


# Keys a resumed run may change: where things are and how they are shown, and the length of the run.
RESUMABLE_KEYS = (
    "train.epochs", "train.out_dir", "train.device", "train.deterministic", "train.threads",
    "train.allocator", "train.progress", "train.plot", "train.tensorboard", "train.checkpoint_every_steps",
    "train.eval_every_epochs", "train.log_every_steps", "train.picture_images", "train.picture_score_threshold",
    "data.workers", "data.eval_batch_size", "data.cache", "data.on_corrupt", "data.train", "data.val",
    "data.test", "data.train_annotations", "data.val_annotations", "data.test_annotations", "model.weights",
    "model.weights_source", "model.compile",
)
RUN_FILES = ("config.json", "steps.csv", "metrics.csv", "summary.json", "checkpoints")


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"train.out_dir {str(out_dir)!r}: {str(folder)!r} is a file, not a folder")
    if resume and not has_checkpoint(out_dir):
        raise ValueError(f"--resume: no checkpoint in {out_dir}/checkpoints (expected last.json)")
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not resume and found and not overwrite:
        what = "a checkpoint; pass --resume to continue it," if has_checkpoint(out_dir) else f"an earlier run ({found});"
        raise ValueError(f"{out_dir} already holds {what} pass --overwrite to replace it, or choose another "
                         "train.out_dir")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("context", "nonlocal_blocks", "detector"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between a checkpoint's config and the new one: (old, new).

    The saved config is read with today's schema first, so a key added since, at its default, is no change.
    """
    try:
        saved = config_from_dict(saved).to_dict()
    except ConfigError:  # a key since removed or renamed: compare as saved, the change is then reported
        pass
    old_flat, new_flat = _flat(saved), _flat(new)
    return {k: (old_flat.get(k), new_flat.get(k)) for k in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(k) != new_flat.get(k)}


@contextlib.contextmanager
def _run_lock(out_dir: Path, context: distributed.DistContext) -> Iterator[None]:
    """Hold `<out_dir>/.lock` for the run (rank 0), so a second run in the same folder stops at once."""
    if not context.is_main:
        yield
        return
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ValueError(f"{out_dir} is in use by another run (process {handle.read().strip() or '?'}); "
                             "wait for it or choose another train.out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear(out_dir: Path) -> None:
    """Remove an earlier run's files from `out_dir` (train --overwrite)."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def train(config: Config, build: Callable[[distributed.DistContext], RunParts], resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train (or resume) the run `config` describes with the parts `build` makes; see the module docstring.

    Args:
        config: the whole run (its `train` section drives the loop).
        build: makes the task, sampler, optimizer and schedule once the process group is up.
        resume: continue from `<out_dir>/checkpoints/last.json`. Without it an out_dir that holds
            an earlier run is refused, unless `overwrite` replaces it.

    Raises:
        NonFiniteLossError: the loss, the weights or the BN statistics became NaN/inf; nothing is
            saved after the last good checkpoint.
    """
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    if config.train.allocator == "retained" and preloaded_allocator() is None:
        retain_freed_memory()
    out_dir = Path(config.train.out_dir)
    _check_out_dir(out_dir, resume, overwrite)
    context = distributed.setup(config.train.device)
    try:
        with _run_lock(out_dir, context), _determinism(config.train.deterministic):
            if overwrite and not resume and context.is_main:
                _clear(out_dir)
            distributed.barrier(context)
            _seed_all(config.train.seed)
            return _Loop(config, build(context), context).run(resume)
    finally:
        distributed.cleanup(context)


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms only while the run lasts (train.deterministic); the caller's setting after."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable GEMMs
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


class _Loop:
    def __init__(self, config: Config, parts: RunParts, context: distributed.DistContext) -> None:
        self.config, self.parts, self.context = config, parts, context
        self.task = parts.task
        self.model = parts.task.model
        self.out_dir = Path(config.train.out_dir)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.train.precision == "fp16")
        self.state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_score": None,
                                      "last_path": None}
        self.result = TrainResult(self.out_dir, parameters=count_parameters(self.model))
        self.train_model: nn.Module = self.model
        self.steps_log: CsvLog | None = None
        self.epochs_log: CsvLog | None = None
        self.tb: TensorBoardLog | None = None
        self._tick = 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = load_checkpoint(self.out_dir)
        changes = config_changes(ckpt.state["config"], self.config.to_dict())
        fixed = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
        if fixed:
            shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
            raise ValueError(f"--resume: the config changes {shown}, which a resumed run cannot change (the restored "
                             "model, optimizer and schedule keep the checkpoint's); start a new run, e.g. with "
                             f"model.weights={self.out_dir} model.weights_source=gcnet to start from its weights")
        missing = sorted(set(self.model.state_dict()) - set(ckpt.model))
        unexpected = sorted(set(ckpt.model) - set(self.model.state_dict()))
        if missing or unexpected:
            raise ValueError(f"--resume: the checkpoint {ckpt.path} holds another model than the config builds "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was model.* changed?")
        self.model.load_state_dict(ckpt.model)
        self.parts.optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler = self.parts.scheduler
        scheduler.load_state_dict(ckpt.state["scheduler"])
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:  # the lr of the next step under this run's schedule (train.epochs may have changed)
            for group, base, factor in zip(self.parts.optimizer.param_groups, scheduler.base_lrs, lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        self.scaler.load_state_dict(ckpt.state["scaler"])
        for key in ("epoch", "batch_in_epoch", "step", "best_score", "epoch_so_far"):
            self.state[key] = ckpt.state.get(key)
        self.state["last_path"] = str(ckpt.path)
        set_rng_state(ckpt.state["rng"])
        if self.context.is_main:
            logger.info("resumed %s at epoch %d, step %d", ckpt.path, self.state["epoch"], self.state["step"])
            for key, (old, new) in changes.items():
                logger.info("--resume: %s changes from %r to %r", key, old, new)

    def _open_logs(self, resume: bool) -> None:
        if not self.context.is_main:
            return
        tc = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        keep = self.state["step"] if resume else -1
        step_fields = ["step", "epoch", "loss", *self.task.loss_terms, "lr", "time_s"]
        epoch_fields = ["epoch", "step", "lr", "train_loss", "train_top1",
                        *(f"val_{k}" for k in self.task.eval_fields), "images_per_s", "epoch_time_s", "skipped"]
        self.steps_log = CsvLog(self.out_dir / "steps.csv", step_fields, keep_until_step=keep)
        self.epochs_log = CsvLog(self.out_dir / "metrics.csv", epoch_fields, keep_until_step=keep)
        if tc.tensorboard:
            self.tb = TensorBoardLog(self.out_dir / "tb", purge_step=self.state["step"] if resume else None)

    def _check_finite(self) -> None:
        """Stop before saving when any weight or buffer (BN statistics) is NaN/inf on any rank."""
        bad = [name for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers())
               if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        flag = distributed.all_reduce_sum(self.context, torch.tensor([float(bool(bad))]))
        if flag.item():
            where = self.state["last_path"] or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"weights or BatchNorm statistics are not finite after step {self.state['step']} "
                f"({bad[:3] or 'on another rank'}) although the loss was; stopped without saving. Last good "
                f"checkpoint: {where}. Lower optim.lr or set optim.grad_clip_norm.")

    def _checkpoint(self, pointers: tuple[str, ...], epoch: int, batch_in_epoch: int) -> None:
        self._check_finite()
        if self.context.is_main:
            path = save_checkpoint(self.out_dir, _unwrap(self.train_model), {
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.state["step"],
                "best_score": self.state["best_score"], "epoch_so_far": self.state.get("epoch_so_far"),
                "optimizer": self.parts.optimizer.state_dict(),
                "scheduler": self.parts.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "config": self.config.to_dict(), "world_size": self.context.world_size,
                **self.task.checkpoint_state(),
            }, pointers)
            self.state["last_path"] = str(path)
        distributed.barrier(self.context)

    def _evaluate(self, split: str, final: bool = False) -> dict[str, Any] | None:
        distributed.broadcast_buffers(self.context, self.model)  # every rank evaluates what rank 0 saves
        return self.task.evaluate(self.model, split, self.context, final)

    # -- the run --------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        tc, ctx = self.config.train, self.context
        started = time.perf_counter()
        if resume:
            self._resume()
        if ctx.distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if self.config.model.compile:
            self.train_model = torch.compile(self.train_model)
        self._open_logs(resume)
        logger.info("%s: %d trainable parameters, %d training samples, %d steps/epoch of %d (x%d accumulation) "
                    "on %d process(es)", self.config.model.name, self.result.parameters, len(self.parts.train_set),
                    self.parts.steps_per_epoch, self.config.data.batch_size, tc.accumulation_steps, ctx.world_size)
        if ctx.device.type == "cpu" and any(isinstance(m, NonLocal) for m in self.model.modules()):
            logger.info("non-local blocks' float32 products: %s", describe_onednn_products())
        throughputs = []
        ran_epochs = False
        try:
            for epoch in range(self.state["epoch"], tc.epochs):
                ran_epochs = True
                row = self._epoch(epoch)
                throughputs.append(row["images_per_s"])
                last = epoch + 1 == tc.epochs
                pointers: tuple[str, ...] = ("last",)
                if self.task.has_split("val") and (last or (tc.eval_every_epochs and
                                                            (epoch + 1) % tc.eval_every_epochs == 0)):
                    val = self._evaluate("val", final=last)
                    self.result.val = val
                    if val is not None:
                        self.result.skipped.extend(val.get("skipped_paths", []))
                        row.update({f"val_{k}": val.get(k) for k in self.task.eval_fields})
                        score = val.get(self.task.score_name)
                        best = self.state["best_score"]
                        if score is not None and (best is None or score > best):
                            self.state["best_score"] = score
                            pointers = ("last", "best")
                self.state["batch_in_epoch"] = 0
                self._checkpoint(pointers, epoch + 1, 0)
                self.result.epochs.append(row)
                if ctx.is_main:
                    self.epochs_log.write(row)  # type: ignore[union-attr]
                    if self.tb is not None:
                        self.tb.write(self.state["step"], {f"epoch/{k}": float(v) for k, v in row.items()
                                                           if isinstance(v, (int, float)) and k not in ("epoch", "step")})
                    logger.info("epoch %d/%d %s", epoch + 1, tc.epochs,
                                {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()})
        finally:
            for log in (self.steps_log, self.epochs_log, self.tb):
                if log is not None:
                    log.close()
        if not ran_epochs:
            return self._finished_before(started)
        self.result.best_score = self.state["best_score"]
        self.result.images_per_s = sum(throughputs) / len(throughputs) if throughputs else 0.0
        if self.task.has_split("test"):
            self.result.test = self._evaluate("test", final=True)
            if self.result.test is not None:
                self.result.skipped.extend(self.result.test.get("skipped_paths", []))
        self.result.seconds = time.perf_counter() - started
        if ctx.is_main:
            self._write_summary()
            title = f"{self.config.task} {self.config.model.name}"
            if tc.plot and (self.out_dir / "metrics.csv").is_file():
                plot_curves(self.out_dir / "metrics.csv", self.out_dir / "curves.png", title=title)
                plot_step_losses(self.out_dir / "steps.csv", self.out_dir / "loss_curve.png",
                                 ("loss", *self.task.loss_terms), title=title)
            self.task.finish(self.out_dir, title)
        return self.result

    def _finished_before(self, started: float) -> TrainResult:
        """`--resume` of a run that had already finished: report its summary, write nothing."""
        summary_file = self.out_dir / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            self.result.val, self.result.test = summary.get("val"), summary.get("test")
            self.result.best_score = summary.get("best_score")
            self.result.images_per_s = summary.get("images_per_s", 0.0)
        logger.info("the run in %s had already finished all %d epochs", self.out_dir, self.config.train.epochs)
        self.result.seconds = time.perf_counter() - started
        return self.result

    def _write_summary(self) -> None:
        r = self.result
        summary = {"task": self.config.task, "val": _plain(r.val), "test": _plain(r.test),
                   "best_score": r.best_score, "score_name": self.task.score_name, "images_per_s": r.images_per_s,
                   "seconds_per_step": r.seconds_per_step, "seconds": r.seconds, "parameters": r.parameters,
                   "steps": self.state["step"], "first_loss": r.step_losses[0] if r.step_losses else None,
                   "last_loss": r.step_losses[-1] if r.step_losses else None,
                   "skipped": sorted(set(r.skipped)), "world_size": self.context.world_size}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # -- one epoch ------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> dict[str, Any]:
        tc, ctx, parts = self.config.train, self.context, self.parts
        accumulation = tc.accumulation_steps
        start_batch = self.state["batch_in_epoch"] if epoch == self.state["epoch"] else 0
        parts.sampler.set_epoch(epoch, start_batch)
        parts.train_set.set_epoch(epoch)
        self.train_model.train()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, samples, skipped
        has_correct = False
        skipped: list[str] = []
        before = {"images": 0, "seconds": 0.0}  # the part of a resumed epoch run before the checkpoint
        so_far = self.state.pop("epoch_so_far", None) if start_batch else None
        if so_far is not None:
            if ctx.is_main:  # the saved sums are global: add them once
                totals += so_far["totals"]
                skipped.extend(so_far["skipped"])
            has_correct = so_far["has_correct"]
            before = {"images": so_far["images"], "seconds": so_far["seconds"]}
        bar = tqdm(total=parts.steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                   unit="step", disable=None if ctx.is_main and tc.progress else True, dynamic_ncols=True, leave=False)
        started = time.perf_counter()
        self._tick = started
        images = 0
        batch_index = start_batch
        micro: list[Any] = []
        for batch in parts.loader if start_batch < parts.steps_per_epoch else ():
            micro.append(batch)
            if len(micro) < accumulation:
                continue
            batch_skipped = [p for b in micro for p in self.task.skipped(b)]
            if batch_skipped:
                skipped.extend(batch_skipped)
                totals[3] += len(batch_skipped)
                for path in batch_skipped:
                    logger.warning("skipped corrupt file %s", path)
            outcome = self._step(micro, epoch)
            micro = []
            batch_index += 1
            if outcome is not None:
                loss_value, samples, correct = outcome
                images += samples
                totals[0] += loss_value * samples
                totals[2] += samples
                if correct is not None:
                    has_correct = True
                    totals[1] += correct
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images * ctx.world_size / max(elapsed, 1e-9):.0f}")
                every = tc.checkpoint_every_steps
                if every and self.state["step"] % every == 0 and batch_index < parts.steps_per_epoch:
                    self.state["batch_in_epoch"] = batch_index
                    global_totals = distributed.all_reduce_sum(ctx, totals.clone())
                    self.state["epoch_so_far"] = {"totals": global_totals, "images": images * ctx.world_size,
                                                  "seconds": time.perf_counter() - started,
                                                  "has_correct": has_correct, "skipped": list(skipped)}
                    self._checkpoint(("last",), epoch, batch_index)
            bar.update(1)
            if batch_index >= parts.steps_per_epoch:
                break
        bar.close()
        self.state["epoch_so_far"] = None
        elapsed = time.perf_counter() - started
        distributed.all_reduce_sum(ctx, totals)
        self.result.skipped.extend(skipped)
        if skipped and ctx.is_main:
            logger.warning("epoch %d: skipped %d corrupt files: %s", epoch + 1, len(skipped), skipped)
        count = max(totals[2].item(), 1.0)
        return {
            "epoch": epoch + 1,
            "step": self.state["step"],
            "lr": parts.optimizer.param_groups[0]["lr"],
            "train_loss": totals[0].item() / count,
            "train_top1": 100.0 * totals[1].item() / count if has_correct else None,
            "images_per_s": (images * ctx.world_size + before["images"]) / max(elapsed + before["seconds"], 1e-9),
            "epoch_time_s": elapsed + before["seconds"],
            "skipped": int(totals[3].item()),
        }

    def _step(self, micro: list[Any], epoch: int) -> tuple[float, int, float | None] | None:
        """One optimizer step over this process's micro-batches; None when all were skipped (alone)."""
        tc, ctx, parts = self.config.train, self.context, self.parts
        optimizer, model = parts.optimizer, self.train_model
        accumulation = len(micro)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(1 + len(self.task.loss_terms), dtype=torch.float64)
        samples, correct, has_correct, ran = 0, 0.0, False, 0
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        for m, batch in enumerate(micro):
            sync = m == accumulation - 1 or not ctx.distributed
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(model.no_sync())  # type: ignore[operator]
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(micro_batch_seed(tc.seed, self.state["step"], m * ctx.world_size + ctx.rank))
                out = self.task.loss(model, batch)
                if out is None:
                    if ctx.distributed:
                        raise RuntimeError(f"every file of a micro-batch was corrupt ({self.task.skipped(batch)}); "
                                           "under torchrun the ranks cannot skip a step alone: fix the files or "
                                           "set data.on_corrupt=error")
                    continue
                self.scaler.scale(out.loss / accumulation).backward()
            ran += 1
            loss_sum[0] += float(out.loss.detach())
            for i, name in enumerate(self.task.loss_terms, start=1):
                if name in out.terms:
                    loss_sum[i] += float(out.terms[name].detach())
            samples += out.samples
            if out.correct is not None:
                has_correct = True
                correct += float(out.correct)
        if ran == 0:
            return None
        loss_sum /= ran
        distributed.all_reduce_sum(ctx, loss_sum)
        loss_sum /= ctx.world_size
        loss_value = float(loss_sum[0])
        if not math.isfinite(loss_value):
            where = self.state["last_path"] or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch + 1}, step {self.state['step'] + 1}; stopped without saving. "
                f"Last good checkpoint: {where}. Lower optim.lr, set optim.grad_clip_norm or train.precision=fp32.")
        if self.config.optim.grad_clip_norm is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                     self.config.optim.grad_clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # fp16: GradScaler skips the optimizer's step on overflow; the schedule advances all the same.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            parts.scheduler.step()
        self.state["step"] += 1
        now = time.perf_counter()
        seconds, self._tick = now - self._tick, now
        self.result.step_seconds.append(seconds)
        self.result.step_losses.append(loss_value)
        terms = {name: float(loss_sum[i]) for i, name in enumerate(self.task.loss_terms, start=1)}
        if self.steps_log is not None:
            self.steps_log.write({"step": self.state["step"], "epoch": epoch + 1, "loss": repr(loss_value),
                                  **{k: repr(v) for k, v in terms.items()}, "lr": lr,
                                  "time_s": f"{seconds:.4f}"})
        if self.tb is not None:
            self.tb.write(self.state["step"], {"train/loss": loss_value, "train/lr": lr,
                                               **{f"train/{k}": v for k, v in terms.items()}})
        every = tc.log_every_steps
        if every and self.state["step"] % every == 0 and ctx.is_main:
            logger.info("epoch %d step %d loss %.4f %s lr %.4g", epoch + 1, self.state["step"], loss_value,
                        " ".join(f"{k} {v:.3f}" for k, v in terms.items()), lr)
        return loss_value, samples, correct if has_correct else None


def _plain(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metrics without the per-file lists (summary.json keeps them once, under "skipped")."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k != "skipped_paths"}

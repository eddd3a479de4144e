"""The training loop: one process or many under torchrun, resumable to the exact same losses.

    for epoch: for batch: loss = CE(model(x), y) -> backward -> clip -> step -> lr step
               [validate] -> checkpoint last (and best) -> metrics.csv row
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from gcnet.data.build import DataSplits, build_datasets
from gcnet.data.sampling import ResumableDistributedSampler, SeededDataset, collate_skipping
from gcnet.engine import distributed
from gcnet.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gcnet.engine.config import Config
from gcnet.engine.evaluate import autocast, evaluate, make_eval_loader, to_device
from gcnet.engine.metrics import CsvLog, TensorBoardLog, count_parameters, plot_curves, topk_correct
from gcnet.engine.optim import build_optimizer, build_scheduler

logger = logging.getLogger("gcnet.train")

STEP_FIELDS = ["step", "epoch", "loss", "lr"]
EPOCH_FIELDS = ["epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "images_per_s", "epoch_time_s", "skipped"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is untouched."""


@dataclass
class TrainResult:
    """What a `train` call did: losses of each step it ran, last metrics, where things are."""

    out_dir: Path
    step_losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    best_top1: float | None = None
    images_per_s: float = 0.0
    seconds: float = 0.0
    parameters: int = 0
    skipped_paths: list[str] = field(default_factory=list)


def build_model(config: Config) -> nn.Module:
    """The model the config names, from `gcnet.models.create_model`."""
    from gcnet.models import create_model

    options = dict(config.model.options)
    if config.model.context is not None:  # None keeps a named configuration's own preset
        options["context"] = config.model.context
    return create_model(config.model.name, num_classes=config.model.num_classes, **options)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


def train(
    config: Config,
    resume: bool = False,
    model: nn.Module | None = None,
    model_factory: Callable[[Config], nn.Module] | None = None,
) -> TrainResult:
    """Train (or resume) the run `config` describes; see the module docstring for the loop.

    Args:
        config: the whole run.
        resume: continue from `<out_dir>/checkpoints/last.json`; without it an out_dir that already
            holds a checkpoint is refused rather than overwritten.
        model, model_factory: a ready module, or a function building one from the config, instead
            of `gcnet.models.create_model` (tests, custom networks).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; nothing is saved after the last good checkpoint.
    """
    tc = config.train
    if model is not None and model_factory is not None:
        raise TypeError("pass model or model_factory, not both")
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    context = distributed.setup(tc.device)
    try:
        return _train(config, resume, model, model_factory, context)
    finally:
        distributed.cleanup(context)


def _train(
    config: Config,
    resume: bool,
    model: nn.Module | None,
    model_factory: Callable[[Config], nn.Module] | None,
    context: distributed.DistContext,
) -> TrainResult:
    tc, dc = config.train, config.data
    out_dir = Path(tc.out_dir)
    started = time.perf_counter()
    if dc.batch_size % context.world_size:
        raise ValueError(f"data.batch_size={dc.batch_size} must be divisible by the {context.world_size} processes")
    if resume and not has_checkpoint(out_dir):
        raise ValueError(f"--resume: no checkpoint in {out_dir}/checkpoints (expected last.json)")
    if not resume and has_checkpoint(out_dir):
        raise ValueError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose "
                         "another train.out_dir")
    distributed.barrier(context)
    _seed_all(tc.seed)

    splits: DataSplits = build_datasets(dc, tc.seed)
    train_set = SeededDataset(splits.train, tc.seed)
    sampler = ResumableDistributedSampler(train_set, context.world_size, context.rank, shuffle=True, seed=tc.seed)
    per_rank_batch = dc.batch_size // context.world_size
    loader_generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=dc.workers,
                              collate_fn=collate_skipping, drop_last=True, generator=loader_generator)
    full_steps = len(sampler) // per_rank_batch
    if full_steps == 0:
        raise ValueError(f"the training set ({len(train_set)} items) gives no full batch of {dc.batch_size}")
    steps_per_epoch = min(full_steps, tc.max_steps_per_epoch or full_steps)
    eval_batch = dc.eval_batch_size or dc.batch_size
    val_loader = make_eval_loader(splits.val, eval_batch, dc.workers, context) if splits.val else None

    if model is None:
        model = model_factory(config) if model_factory is not None else build_model(config)
    if config.model.sync_batchnorm and context.distributed:
        model = distributed.convert_sync_batchnorm(model, context.device)
    memory_format = torch.channels_last if config.model.channels_last else torch.preserve_format
    model = model.to(context.device, memory_format=memory_format)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, tc.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16")

    state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_top1": None, "last_path": None}
    if resume:
        ckpt = load_checkpoint(out_dir)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        scaler.load_state_dict(ckpt.state["scaler"])
        for key in ("epoch", "batch_in_epoch", "step", "best_top1"):
            state[key] = ckpt.state[key]
        state["last_path"] = str(ckpt.path)
        set_rng_state(ckpt.state["rng"])
        if context.is_main:
            logger.info("resumed %s at epoch %d, step %d", ckpt.path, state["epoch"], state["step"])
            if ckpt.state["config"] != config.to_dict():
                logger.warning("the config differs from the checkpoint's; continuing with the new one")

    train_model: nn.Module = model
    if context.distributed:
        train_model = DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda"
                                              else None)
    if config.model.compile:
        train_model = torch.compile(train_model)

    result = TrainResult(out_dir=out_dir, parameters=count_parameters(model), best_top1=state["best_top1"])
    steps_log = epochs_log = tb = None
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        keep = state["step"] if resume else None
        steps_log = CsvLog(out_dir / "steps.csv", STEP_FIELDS, keep_until_step=keep if keep is not None else -1)
        epochs_log = CsvLog(out_dir / "metrics.csv", EPOCH_FIELDS, keep_until_step=keep if keep is not None else -1)
        if tc.tensorboard:
            tb = TensorBoardLog(out_dir / "tb", purge_step=state["step"] if resume else None)

    def checkpoint(pointers: tuple[str, ...], epoch: int, batch_in_epoch: int) -> None:
        if context.is_main:
            path = save_checkpoint(out_dir, _unwrap(train_model), {
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": state["step"],
                "best_top1": state["best_top1"], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "config": config.to_dict(), "classes": list(splits.classes), "world_size": context.world_size,
            }, pointers)
            state["last_path"] = str(path)
        distributed.barrier(context)

    throughputs = []
    try:
        for epoch in range(state["epoch"], tc.epochs):
            start_batch = state["batch_in_epoch"] if epoch == state["epoch"] else 0
            sampler.set_epoch(epoch)
            sampler.set_start(start_batch * per_rank_batch)
            train_set.set_epoch(epoch)
            loader_generator.manual_seed(tc.seed * 7919 + epoch)
            metrics = _train_epoch(config, context, train_model, optimizer, scheduler, scaler, train_loader,
                                   epoch, start_batch, steps_per_epoch, state, result, steps_log, tb, checkpoint)
            throughputs.append(metrics["images_per_s"])
            row: dict[str, Any] = {"epoch": epoch + 1, "step": state["step"], **metrics}
            last_epoch = epoch + 1 == tc.epochs
            pointers: tuple[str, ...] = ("last",)
            if val_loader is not None and ((epoch + 1) % tc.eval_every_epochs == 0 or last_epoch):
                val = evaluate(model, val_loader, context, tc.precision, config.model.channels_last)
                result.val = val
                result.skipped_paths.extend(val["skipped_paths"])
                row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
                if state["best_top1"] is None or val["top1"] > state["best_top1"]:
                    state["best_top1"] = val["top1"]
                    pointers = ("last", "best")
            state["batch_in_epoch"] = 0
            checkpoint(pointers, epoch + 1, 0)
            result.epochs.append(row)
            if context.is_main:
                epochs_log.write(row)  # type: ignore[union-attr]
                if tb is not None:
                    tb.write(state["step"], {f"epoch/{k}": float(v) for k, v in row.items()
                                             if isinstance(v, (int, float)) and k not in ("epoch", "step")})
                logger.info("epoch %d/%d %s", epoch + 1, tc.epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                                    for k, v in row.items()})
    finally:
        for log in (steps_log, epochs_log, tb):
            if log is not None:
                log.close()

    result.best_top1 = state["best_top1"]
    result.images_per_s = sum(throughputs) / len(throughputs) if throughputs else 0.0
    if splits.test is not None:
        test_loader = make_eval_loader(splits.test, eval_batch, dc.workers, context)
        result.test = evaluate(model, test_loader, context, tc.precision, config.model.channels_last)
        result.skipped_paths.extend(result.test["skipped_paths"])
    result.seconds = time.perf_counter() - started
    if context.is_main:
        summary = {"val": result.val, "test": result.test, "best_val_top1": result.best_top1,
                   "images_per_s": result.images_per_s, "seconds": result.seconds, "parameters": result.parameters,
                   "skipped_paths": sorted(set(result.skipped_paths)), "world_size": context.world_size}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if tc.plot and (out_dir / "metrics.csv").is_file():
            plot_curves(out_dir / "metrics.csv", out_dir / "curves.png", title=config.model.name)
    return result


def _train_epoch(
    config: Config,
    context: distributed.DistContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: DataLoader,
    epoch: int,
    start_batch: int,
    steps_per_epoch: int,
    state: dict[str, Any],
    result: TrainResult,
    steps_log: CsvLog | None,
    tb: TensorBoardLog | None,
    checkpoint: Callable[[tuple[str, ...], int, int], None],
) -> dict[str, Any]:
    tc = config.train
    device = context.device
    model.train()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, samples, skipped
    skipped_paths: list[str] = []
    bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step",
               disable=None if context.is_main and tc.progress else True,  # None: off when not a terminal
               dynamic_ncols=True, leave=False)
    started = time.perf_counter()
    images = 0
    batch_index = start_batch
    for batch in loader if start_batch < steps_per_epoch else ():
        if batch["skipped"]:
            skipped_paths.extend(batch["skipped"])
            totals[3] += len(batch["skipped"])
            for path in batch["skipped"]:
                logger.warning("skipped corrupt file %s", path)
        if batch["input"] is None:
            if context.distributed:
                raise RuntimeError(f"every file of a batch was corrupt ({batch['skipped']}); under torchrun the "
                                   "ranks cannot skip a step alone: fix the files or set data.on_corrupt=error")
            batch_index += 1
            if batch_index >= steps_per_epoch:
                break
            continue
        x = to_device(batch["input"], device, config.model.channels_last)
        target = batch["target"].to(device, non_blocking=True)
        with autocast(device, tc.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=tc.label_smoothing)
        reported = distributed.all_reduce_sum(context, loss.detach().clone().double()) / context.world_size
        loss_value = float(reported)
        if not math.isfinite(loss_value):
            where = state["last_path"] or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch + 1}, step {state['step'] + 1}; stopped without saving. "
                f"Last good checkpoint: {where}. Lower optim.lr, set optim.grad_clip_norm or train.precision=fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.optim.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["step"] += 1
        batch_index += 1
        n = target.shape[0]
        images += n * context.world_size
        totals[0] += loss.detach().double() * n
        totals[1] += topk_correct(logits.detach().float(), target, ks=(1,))[0]
        totals[2] += n
        result.step_losses.append(loss_value)
        if steps_log is not None:
            steps_log.write({"step": state["step"], "epoch": epoch + 1, "loss": repr(loss_value), "lr": lr})
        if tb is not None:
            tb.write(state["step"], {"train/loss": loss_value, "train/lr": lr})
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{images / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        every = tc.checkpoint_every_steps
        if every and state["step"] % every == 0 and batch_index < steps_per_epoch:
            state["batch_in_epoch"] = batch_index
            checkpoint(("last",), epoch, batch_index)
        if batch_index >= steps_per_epoch:
            break
    bar.close()
    elapsed = time.perf_counter() - started
    distributed.all_reduce_sum(context, totals)
    result.skipped_paths.extend(skipped_paths)
    if skipped_paths and context.is_main:
        logger.warning("epoch %d: skipped %d corrupt files: %s", epoch + 1, len(skipped_paths), skipped_paths)
    count = max(totals[2].item(), 1.0)
    return {
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": totals[0].item() / count,
        "train_top1": 100.0 * totals[1].item() / count,
        "images_per_s": images / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
        "skipped": int(totals[3].item()),
    }

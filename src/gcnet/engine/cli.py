"""`gcnet train`, `gcnet eval` and `gcnet demo` subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add train, eval and demo to the `gcnet` command."""
    train = subparsers.add_parser("train", help="train a model from a YAML config (also under torchrun)")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.json")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("eval", help="evaluate a checkpoint on a data folder or list file")
    evaluate.add_argument("checkpoint", help="run folder, checkpoints/last.json|best.json or a checkpoint folder")
    evaluate.add_argument("--data", required=True, help="ImageFolder root, clip folder or clip list file")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override the checkpoint's config, e.g. --set data.eval_batch_size=256")
    evaluate.set_defaults(handler=run_eval)

    demo = subparsers.add_parser("demo", help="train a CIFAR ResNet with no block, SE, GC and NL; print a table")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--data", default=None, help="CIFAR-10 ImageFolder root (default: ../shared/data/cifar10)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per model (default from the demo config)")
    demo.add_argument("--train-per-class", type=int, default=None, help="training images per class")
    demo.set_defaults(handler=run_demo)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    """Handler of `gcnet train`; a `task: detection` config goes to `gcnet.detection`."""
    from gcnet.detection.config import is_detection_config
    from gcnet.engine.config import load_config
    from gcnet.engine.train import NonFiniteLossError, train

    if Path(args.config).is_file() and is_detection_config(args.config):
        from gcnet.detection.cli import run_train as run_detection_train

        return run_detection_train(args)
    _logging()
    try:
        config = load_config(args.config, args.overrides)
        result = train(config, resume=args.resume)
    except (ValueError, TypeError) as error:
        print(f"gcnet train: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"gcnet train: {error}", file=sys.stderr)
        return 3
    if result.test is not None:
        print(json.dumps({"test_top1": result.test["top1"], "test_top5": result.test["top5"]}))
    return 0


def evaluate_checkpoint(
    checkpoint: str | Path, data: str, overrides: list[str] | None = None, model: nn.Module | None = None
) -> dict[str, Any]:
    """Load a checkpoint, rebuild its model (or use `model`) and evaluate it on `data`."""
    from gcnet.data.build import build_eval_dataset
    from gcnet.engine import distributed
    from gcnet.engine.checkpoint import load_checkpoint
    from gcnet.engine.config import apply_overrides, config_from_dict
    from gcnet.engine.evaluate import evaluate, make_eval_loader
    from gcnet.engine.train import build_model

    ckpt = load_checkpoint(checkpoint)
    config = config_from_dict(apply_overrides(ckpt.state["config"], list(overrides or [])))
    context = distributed.setup(config.train.device)
    try:
        net = model if model is not None else build_model(config)
        net.load_state_dict(ckpt.model)
        net.to(context.device)
        dataset = build_eval_dataset(config.data, data)
        loader = make_eval_loader(dataset, config.data.eval_batch_size or config.data.batch_size,
                                  config.data.workers, context)
        metrics = evaluate(net, loader, context, config.train.precision, config.model.channels_last)
    finally:
        distributed.cleanup(context)
    metrics.update(checkpoint=str(ckpt.path), epoch=ckpt.state["epoch"], step=ckpt.state["step"])
    return metrics


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `gcnet eval`; a detection checkpoint is COCO-evaluated by `gcnet.detection`."""
    from gcnet.detection.train import is_detection_checkpoint

    try:
        detection = is_detection_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError):
        detection = False  # evaluate_checkpoint below reports the missing checkpoint
    if detection:
        from gcnet.detection.cli import run_eval as run_detection_eval

        return run_detection_eval(args)
    _logging()
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, args.overrides)
    except (ValueError, TypeError) as error:
        print(f"gcnet eval: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `gcnet demo`."""
    from gcnet.engine.demo import run

    _logging()
    try:
        return run(Path(args.out), args.data, args.epochs, args.train_per_class)
    except (ValueError, TypeError) as error:
        print(f"gcnet demo: {error}", file=sys.stderr)
        return 2

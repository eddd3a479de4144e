"""The `gcnet` command line, every verb in one place: train, eval, analyze, demo, info, tour, configs.

Each handler parses its arguments, calls the library and turns a bad input (a config key, a path, a
corrupt file under `data.on_corrupt: error`) into one line naming the command and what was wrong
(exit 2); a non-finite loss, weight or BN statistic exits 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def run_train(args: argparse.Namespace) -> int:
    """`gcnet train CONFIG`: any task, alone or under torchrun."""
    from gcnet.builder import train
    from gcnet.config import load_config

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    shown = {"out_dir": str(result.out_dir), "val": result.val, "test": result.test,
             "best_score": result.best_score, "seconds_per_step": round(result.seconds_per_step, 4)}
    print(json.dumps({k: v for k, v in shown.items() if v is not None}, indent=2, default=str))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`gcnet eval CHECKPOINT --data DATA`: classification or COCO metrics of a trained checkpoint."""
    from gcnet.builder import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.overrides, args.annotations,
                                  max_images=args.max_images, picture=args.picture)
    print(json.dumps({k: v for k, v in metrics.items() if k != "skipped_paths"}, indent=2))
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    """`gcnet analyze CHECKPOINT --data DIR --out REPORT`: attention maps and query-independence statistics."""
    import torch

    from gcnet.analysis.report import analyze, batches_of
    from gcnet.builder import load_trained

    if args.batches < 1 or args.batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be >= 1, got {args.batches} and {args.batch_size}")
    trained = load_trained(args.checkpoint, args.overrides)
    if trained.config.task == "detection":
        raise ValueError("analyze takes classification checkpoints (image or video); this one is detection")
    if trained.config.train.threads is not None:
        torch.set_num_threads(trained.config.train.threads)
    dataset = trained.eval_dataset(args.data)
    summary = analyze(trained.model, batches_of(dataset, args.batch_size), args.out, args.batches)
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out}/report.md")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`gcnet demo`: CIFAR ResNet-20 with no block, SE, GC and NL on the same budget, one table."""
    from gcnet.demo import run

    return run(Path(args.out), args.data, args.epochs, args.train_per_class)


def run_info(args: argparse.Namespace) -> int:
    """`gcnet info NAME`: per-stage blocks, parameters and FLOPs of a registered model."""
    from gcnet.analysis.complexity import complexity_of, default_input_shape
    from gcnet.analysis.info import parse_option, parse_shape
    from gcnet.models import list_models

    if args.list or args.name is None:
        print("\n".join(list_models()))
        return 0
    options = dict(parse_option(o) for o in args.options)
    shape = parse_shape(args.input_shape) if args.input_shape else default_input_shape(args.name, **options)
    print(complexity_of(args.name, shape, **options).table())
    return 0


def run_tour(args: argparse.Namespace) -> int:
    """`gcnet tour`: the blocks' table and an attention-map picture, in seconds."""
    from gcnet.tour import run_tour as tour

    tour(args.out, args.image)
    return 0


def run_configs(args: argparse.Namespace) -> int:
    """`gcnet configs [NAME]`: the configs shipped with gcnet, or one of them as YAML."""
    from gcnet.config import bundled_configs, resolve_config_path

    if args.name is None:
        print("\n".join(bundled_configs()))
    else:
        print(resolve_config_path(args.name).read_text(), end="")
    return 0


def run_convert_nl(args: argparse.Namespace) -> int:
    """`gcnet convert-nl CHECKPOINT --data DIR --out OUT`: NL blocks -> SNL blocks fitted to their own maps."""
    from gcnet.analysis.nl_to_gc import convert_checkpoint

    report = convert_checkpoint(args.checkpoint, args.data, args.out, calibration=args.calibration,
                                batches=args.batches, batch_size=args.batch_size, steps=args.steps)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `gcnet` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="gcnet", description="Global context blocks, models and tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train any task from a YAML config (also under torchrun)")
    train.add_argument("config", help="YAML config file, or the name of a shipped config (gcnet configs)")
    _add_overrides(train, "optim.lr=0.05")
    train.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.json")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in train.out_dir")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a data folder, clip list or COCO data")
    evaluate.add_argument("checkpoint", help="run folder, checkpoints/last.json|best.json or a checkpoint folder")
    evaluate.add_argument("--data", required=True, help="ImageFolder root, clip folder or list file; for detection "
                          "a COCO root with images/ and annotations/instances.json, or the image folder")
    evaluate.add_argument("--annotations", default=None, help="COCO instances json (detection)")
    evaluate.add_argument("--max-images", type=int, default=None, help="evaluate the first N images (detection)")
    evaluate.add_argument("--picture", default=None, help="draw predictions into this PNG (detection)")
    _add_overrides(evaluate, "data.eval_batch_size=256")
    evaluate.set_defaults(handler=run_eval)

    analyze = commands.add_parser("analyze", help="attention maps and query-independence statistics of a checkpoint")
    analyze.add_argument("checkpoint", help="a checkpoint folder or run folder written by `gcnet train`")
    analyze.add_argument("--data", required=True, help="image or video folder, or a `path label` list file, "
                         "to analyse (the checkpoint's layout)")
    analyze.add_argument("--out", required=True, help="report folder: report.md, statistics.png, attention_maps.png")
    analyze.add_argument("--batches", type=int, default=4, help="batches to average over (default 4)")
    analyze.add_argument("--batch-size", type=int, default=16, help="inputs per batch (default 16)")
    _add_overrides(analyze, "train.threads=1")
    analyze.set_defaults(handler=run_analyze)

    demo = commands.add_parser("demo", help="train a CIFAR ResNet with no block, SE, GC and NL; print a table")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--data", default=None, help="CIFAR-10 ImageFolder root (default: $GCNET_DATA/cifar10, "
                      "$GCNET_DATA defaulting to ../shared/data)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per model (default from the demo config)")
    demo.add_argument("--train-per-class", type=int, default=None, help="training images per class")
    demo.set_defaults(handler=run_demo)

    info = commands.add_parser("info", help="per-stage blocks, parameters and FLOPs of a registered model")
    info.add_argument("name", nargs="?", default=None, help="registered model, e.g. resnet50_gc_r16")
    info.add_argument("--input-shape", default=None, metavar="C,H,W",
                      help="input without batch (default 3,224,224; 3,8,224,224 for video; 3,32,32 for CIFAR)")
    info.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                      help="model option, e.g. --option reduction=4 (repeatable)")
    info.add_argument("--list", action="store_true", help="list the registered models")
    info.set_defaults(handler=run_info)

    tour = commands.add_parser("tour", help="a short tour of the blocks: table and attention-map picture")
    tour.add_argument("--out", default="outputs/tour", help="folder for the picture (default: outputs/tour)")
    tour.add_argument("--image", default=None, help="image to show attention on (default: a CIFAR-10 test image)")
    tour.set_defaults(handler=run_tour)

    configs = commands.add_parser("configs", help="list the configs shipped with gcnet, or print one")
    configs.add_argument("name", nargs="?", default=None, help="a shipped config, e.g. cifar10_resnet20")
    configs.set_defaults(handler=run_configs)
    convert = commands.add_parser("convert-nl", help="replace a checkpoint's NL blocks by SNL blocks fitted to "
                                  "their query-averaged attention maps (no retraining)")
    convert.add_argument("checkpoint", help="a checkpoint folder or run folder written by `gcnet train`")
    convert.add_argument("--data", required=True, help="image or video folder the original and converted models "
                         "are evaluated on")
    convert.add_argument("--calibration", default=None, help="folder whose first batches fit the keys (default: "
                         "the checkpoint's data.train, so evaluation data is not used for fitting)")
    convert.add_argument("--out", required=True, help="folder for converted.safetensors and report.json")
    convert.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    convert.add_argument("--batch-size", type=int, default=32, help="inputs per calibration batch (default 32)")
    convert.add_argument("--steps", type=int, default=100, help="L-BFGS iterations per block (default 100)")
    convert.set_defaults(handler=run_convert_nl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gcnet` command; returns the exit status."""
    from gcnet.data.errors import CorruptFileError
    from gcnet.engine.loop import NonFiniteLossError

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    _logging()
    try:
        return int(handler(args))
    except (ValueError, TypeError, FileNotFoundError, CorruptFileError) as error:
        print(f"gcnet {args.command}: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"gcnet {args.command}: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

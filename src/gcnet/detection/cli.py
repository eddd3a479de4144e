"""`gcnet detect-train CONFIG` and `gcnet detect-eval CHECKPOINT --data ROOT` subcommands.

`run_train` / `run_eval` are also what `gcnet train` / `gcnet eval` call for a `task: detection` config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add detect-train and detect-eval to the `gcnet` command."""
    train = subparsers.add_parser(
        "detect-train", help="train a Mask/Faster R-CNN from a task: detection YAML config"
    )
    train.add_argument("config", help="YAML config with task: detection (see configs/detection/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.json")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "detect-eval", help="COCO-evaluate a detection checkpoint (bbox and segm AP)"
    )
    evaluate.add_argument(
        "checkpoint", help="run folder, checkpoints/last.json|best.json or a checkpoint folder"
    )
    evaluate.add_argument(
        "--data",
        required=True,
        help="COCO root holding images/ and annotations/instances.json, or the image folder "
        "when --annotations is given",
    )
    evaluate.add_argument(
        "--annotations", default=None, help="instances json (default: DATA/annotations/instances.json)"
    )
    evaluate.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    evaluate.add_argument(
        "--picture", default=None, help="also draw predictions on the first images into this PNG"
    )
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's config, e.g. --set train.device=cpu",
    )
    evaluate.set_defaults(handler=run_eval)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def resolve_data(data: str, annotations: str | None) -> tuple[Path, Path]:
    """(image folder, annotation json) from --data and --annotations."""
    root = Path(data)
    if annotations is not None:
        return root, Path(annotations)
    images, json_file = root / "images", root / "annotations" / "instances.json"
    if not (images.is_dir() and json_file.is_file()):
        raise ValueError(
            f"--data {data!r} lacks images/ and annotations/instances.json; pass the image folder "
            "and --annotations FILE"
        )
    return images, json_file


def run_train(args: argparse.Namespace) -> int:
    """Handler of `gcnet detect-train` (args: config, overrides, resume); returns the exit status."""
    from gcnet.detection.config import load_detection_config
    from gcnet.detection.train import train_detection
    from gcnet.engine.train import NonFiniteLossError

    _logging()
    try:
        config = load_detection_config(args.config, args.overrides)
        result = train_detection(config, resume=args.resume)
    except (ValueError, TypeError) as error:
        print(f"gcnet detect-train: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"gcnet detect-train: {error}", file=sys.stderr)
        return 3
    if result.evaluation is not None:
        print(
            json.dumps(
                {
                    "metrics": result.evaluation.metrics,
                    "seconds_per_step": result.seconds_per_step,
                    "out_dir": str(result.out_dir),
                },
                indent=2,
            )
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `gcnet detect-eval` (args: checkpoint, data, annotations, max_images, picture, overrides)."""
    from gcnet.detection.train import evaluate_detection_checkpoint

    _logging()
    try:
        images, annotations = resolve_data(args.data, getattr(args, "annotations", None))
        evaluation = evaluate_detection_checkpoint(
            args.checkpoint,
            images,
            annotations,
            overrides=args.overrides,
            picture=getattr(args, "picture", None),
            max_images=getattr(args, "max_images", None),
        )
    except (ValueError, TypeError) as error:
        print(f"gcnet detect-eval: {error}", file=sys.stderr)
        return 2
    print(json.dumps(evaluation.to_dict(), indent=2))
    return 0

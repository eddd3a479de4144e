"""`gcnet analyze CHECKPOINT --data DIR --out REPORT_DIR`: the attention analysis of a trained model."""

from __future__ import annotations

import argparse
import json
import sys


def run_analyze(args: argparse.Namespace) -> int:
    """Handler of `gcnet analyze`."""
    from gcnet.analysis.report import analyze, batches_of
    from gcnet.data.build import build_eval_dataset
    from gcnet.engine.checkpoint import load_checkpoint
    from gcnet.engine.config import config_from_dict
    from gcnet.engine.train import build_model

    try:
        checkpoint = load_checkpoint(args.checkpoint)
        config = config_from_dict(checkpoint.state["config"])
        model = build_model(config)
        model.load_state_dict(checkpoint.model)
        dataset = build_eval_dataset(config.data, args.data)
        summary = analyze(model, batches_of(dataset, args.batch_size), args.out, args.batches)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"gcnet analyze: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out}/report.md")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `gcnet analyze`."""
    parser = subparsers.add_parser("analyze", help="attention maps and query-independence statistics of a checkpoint")
    parser.add_argument("checkpoint", help="a checkpoint folder or run folder written by `gcnet train`")
    parser.add_argument("--data", required=True, help="image or video folder to analyse (the checkpoint's data layout)")
    parser.add_argument("--out", required=True, help="report folder: report.md, statistics.png, attention_maps.png")
    parser.add_argument("--batches", type=int, default=4, help="batches to average over (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per batch (default 16)")
    parser.set_defaults(handler=run_analyze)

"""Subprocess entry for the kill/resume and torchrun tests: train TinyNet from a YAML config.

    python tests/engine/run_tiny.py CONFIG.yaml [--resume] [--slow]
    torchrun --nproc_per_node=2 tests/engine/run_tiny.py CONFIG.yaml
"""

import logging
import sys
import time

import torch

from gcnet.builder import train
from gcnet.config import load_config
from tiny import TinyNet


class SlowTinyNet(TinyNet):
    """TinyNet that sleeps in each forward, so a test can kill the run part-way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    config = load_config(sys.argv[1])
    net = SlowTinyNet if "--slow" in sys.argv[2:] else TinyNet
    train(config, resume="--resume" in sys.argv[2:], model=lambda c: net(c.model.num_classes))

"""Tiny generated data and tiny networks, for the engine tests and their subprocess scripts.

Configs name a registered model (the schema checks it at load); the tests pass the tiny network
itself to `gcnet.builder.train(config, model=...)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from PIL import Image


class TinyNet(nn.Module):
    """conv-BN-ReLU x2, global average pool, linear: enough to learn colour classes in a few steps."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.fc(x.mean(dim=(2, 3)))


class TinyVideoNet(nn.Module):
    """conv3d-BN-ReLU, global pool, linear over (B, 3, T, H, W) clips."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn1(self.conv1(x)).relu().mean(dim=(2, 3, 4)))


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 12, seed: int = 0) -> Path:
    """`root/<class>/<n>.jpg|png`: each class a base colour plus noise, JPEG and PNG mixed."""
    generator = torch.Generator().manual_seed(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = torch.zeros(3, 1, 1)
        base[label % 3] = 200.0
        for i in range(per_class):
            noise = torch.rand(3, size, size, generator=generator) * 55
            image = (base + noise).clamp(0, 255).to(torch.uint8)
            pixels = Image.fromarray(image.permute(1, 2, 0).numpy())
            if i % 2:
                pixels.save(folder / f"{i:03d}.png")
            else:
                pixels.save(folder / f"{i:03d}.jpg", quality=95)
    return root


def image_config(data_root: Path, out_dir: Path, **sections: dict) -> dict:
    """A plain config dict for the tiny image data; `sections` update its sections."""
    config = {
        "model": {"name": "cifar_resnet20", "num_classes": 3},
        "data": {"train": str(data_root), "val_fraction": 0.25, "image_size": 12, "batch_size": 6, "augment": "cifar"},
        "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "train": {"epochs": 3, "seed": 1, "out_dir": str(out_dir), "progress": False, "plot": False},
    }
    for name, values in sections.items():
        config[name].update(values)
    return config



def kill_after_steps(command: list[str], env: dict[str, str], steps_csv: Path, steps: int, timeout: float) -> None:
    """Start `command`, SIGKILL it once `steps_csv` logs `steps` steps; fail if it ends first."""
    import signal
    import subprocess
    import time

    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if steps_csv.is_file() and len(steps_csv.read_text().splitlines()) - 1 >= steps:
            break
        time.sleep(0.01)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
    child.send_signal(signal.SIGKILL)
    child.wait()

"""`pip install .` (a wheel, not editable) into a fresh venv gives a `gcnet` that finds its configs and data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.engine.tiny import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_installed_wheel_runs_train_demo_and_tour_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_XDIST_WORKER")}
    env.update(GCNET_NATIVE="0", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(source)], tmp_path, env)
    (wheel,) = wheels.glob("gcnet-*.whl")

    fresh = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(fresh)], tmp_path, env)
    python = fresh / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).strip())
    # The dependencies (torch, ...) come from this environment's site-packages, appended after the venv's
    # own; its editable gcnet is not picked up (.pth files of an appended folder are not run).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    where = _run([str(python), "-c", "import gcnet, gcnet.config; print(gcnet.__file__, gcnet.config.BUNDLED_CONFIGS)"],
                 tmp_path, env)
    assert str(site) in where and str(ROOT) not in where

    gcnet = str(fresh / "bin" / "gcnet")
    work = tmp_path / "work"  # outside the checkout: no configs/ folder here
    work.mkdir()
    assert "cifar10_resnet20" in _run([gcnet, "configs"], work, env).split()
    data = tmp_path / "data"
    for split in ("train", "test"):
        make_image_folder(data / "cifar10" / split, classes=3, per_class=24, size=32)
    env["GCNET_DATA"] = str(data)
    _run([gcnet, "train", "cifar10_resnet20", "--set", f"data.train={data / 'cifar10' / 'train'}",
          "--set", f"data.test={data / 'cifar10' / 'test'}", "--set", "data.batch_size=32", "--set", "train.epochs=1",
          "--set", "train.max_steps_per_epoch=1", "--set", "train.out_dir=run", "--set", "data.workers=0"], work, env)
    assert (work / "run" / "summary.json").is_file()
    table = _run([gcnet, "demo", "--out", "demo", "--epochs", "1", "--train-per-class", "24"], work, env)
    assert "| gc |" in table and "| nl |" in table
    _run([gcnet, "tour", "--out", "tour"], work, env)
    assert (work / "tour" / "attention_maps.png").stat().st_size > 5_000

"""Imports run only downward: blocks < models, data < config < engine < detection < builder < tools < CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gcnet"

# Lowest first; a module may import its own part and parts of lower layers only.
LAYERS: list[set[str]] = [
    {"gcnet._checks", "gcnet._C", "gcnet._machine"},  # _C: the compiled CPU kernels
    {"gcnet.blocks"},
    {"gcnet.models", "gcnet.data"},
    {"gcnet"},  # the package's __init__: blocks and models
    {"gcnet.config"},
    {"gcnet.engine"},
    {"gcnet.detection"},
    {"gcnet.builder"},
    {"gcnet.analysis", "gcnet.demo", "gcnet.tour"},
    {"gcnet.study"},
    {"gcnet.cli"},
]


def part_of(module: str) -> str:
    """The layer entry a dotted module belongs to (gcnet.engine.loop -> gcnet.engine)."""
    parts = module.split(".")
    for size in (2, 1):
        name = ".".join(parts[:size])
        if any(name in layer for layer in LAYERS):
            return name
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py; add it there")


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def gcnet_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every gcnet import in the file, at any depth (functions, TYPE_CHECKING)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "gcnet"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            if node.module == "gcnet":  # from gcnet import _C
                found += [(node.lineno, f"gcnet.{alias.name}") for alias in node.names]
            elif node.module and node.module.split(".")[0] == "gcnet":
                found.append((node.lineno, node.module))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = part_of(module_name(path))
        for line, imported in gcnet_imports(path):
            target = part_of(imported)
            if target == importer:
                continue
            if layer_of(target) >= layer_of(importer):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports {imported}")
    return problems


def test_no_module_imports_upward() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from gcnet.engine.loop import train\n")
    assert gcnet_imports(bad) == [(2, "gcnet.engine.loop")]
    assert layer_of(part_of("gcnet.engine.loop")) > layer_of(part_of("gcnet.models.resnet"))

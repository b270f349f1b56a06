"""The package's folders are its architecture: imports point down only (lab -> basic -> host)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "basic_plugin"
LAYERS = {"host": 0, "basic": 1, "lab": 2}
#: top-level modules: the entry forwarders and the CLI may import anything
TOP = {"__init__", "train", "train_mem", "cli"}


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def layer_of(module: str):
    parts = module.split(".")
    if parts[0] != "basic_plugin" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_lives_in_a_layer():
    loose = [p.relative_to(PACKAGE) for p in modules()
             if p.parent == PACKAGE and p.stem not in TOP]
    assert not loose, f"modules outside host/, basic/ and lab/: {loose}"


@pytest.mark.parametrize("path", [p for p in modules() if p.parent != PACKAGE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = LAYERS[path.relative_to(PACKAGE).parts[0]]
    upward = [m for m in imported_modules(path) if (layer_of(m) or -1) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports a higher layer: {upward}"


def test_the_method_uses_nothing_of_the_host_but_hookimpl():
    """A plugin (BASIC included) needs only ``basic_plugin.hookimpl``; the host's internals stay private."""
    for path in (PACKAGE / "basic").rglob("*.py"):
        used = [m for m in imported_modules(path) if layer_of(m) == 0]
        assert not used, f"{path.relative_to(PACKAGE)} imports host internals: {used}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from basic_plugin.lab.tiny import build_tiny_llava\nimport basic_plugin.basic.losses\n")
    assert [m for m in imported_modules(bad) if layer_of(m) == 2] and \
        [m for m in imported_modules(bad) if layer_of(m) == 1]

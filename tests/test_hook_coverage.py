"""Every hook is documented in INTEGRATION.md and has a test_hook_<name> that calls it through a real run."""
import ast
import inspect
import pathlib
import re

import pytest

from basic_plugin.host import hookspecs

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("llava_"))


def test_hookspecs_are_found():
    assert {"llava_objective", "llava_plugin_arguments", "llava_train_classes"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = (ROOT / "INTEGRATION.md").read_text(encoding="utf-8")
    assert re.search(rf"^### {hook}$", doc, re.M), f"INTEGRATION.md has no '### {hook}' section"
    signature = inspect.signature(getattr(hookspecs, hook))
    for param in signature.parameters:
        assert param in doc.split(f"### {hook}")[1].split("###")[0], f"{hook}: parameter {param} undocumented"


def _test_functions():
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_its_own_test(hook):
    assert f"test_hook_{hook}" in _test_functions(), f"no test function test_hook_{hook}"


def test_the_documented_example_plugin_is_the_tested_file():
    doc = (ROOT / "INTEGRATION.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "projector_norm_plugin.py").read_text(encoding="utf-8")
    assert f"```python\n{example}```" in doc

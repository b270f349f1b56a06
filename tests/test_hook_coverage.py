"""Every hook is documented for plugin authors in docs/PLUGIN_HOOKS.md and has two tests of its own:
``test_hook_<name>`` calls it through a real ``train()`` run, ``test_hook_<name>_in_process`` through the
host's plugin manager in this process."""
import ast
import inspect
import pathlib
import re

import pytest

from basic_plugin.host import hookspecs

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "PLUGIN_HOOKS.md"
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("llava_"))


def test_hookspecs_are_found():
    assert {"llava_objective", "llava_plugin_arguments", "llava_train_classes"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = GUIDE.read_text(encoding="utf-8")
    assert re.search(rf"^### {hook}$", doc, re.M), f"{GUIDE.name} has no '### {hook}' section"
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
def test_hook_has_its_own_tests(hook):
    names = _test_functions()
    assert f"test_hook_{hook}" in names, f"no test function test_hook_{hook} (through a real run)"
    assert f"test_hook_{hook}_in_process" in names, f"no test function test_hook_{hook}_in_process"


def test_the_documented_example_plugin_is_the_tested_file():
    doc = GUIDE.read_text(encoding="utf-8")
    example = (ROOT / "examples" / "projector_norm_plugin.py").read_text(encoding="utf-8")
    assert f"```python\n{example}```" in doc


def test_the_guide_for_llava_users_sends_plugin_authors_to_it():
    integration = (ROOT / "INTEGRATION.md").read_text(encoding="utf-8")
    assert "docs/PLUGIN_HOOKS.md" in integration
    assert not re.search(r"^### llava_", integration, re.M)  # the hook sections live in one place

"""Every hook is documented in INTEGRATION.md and exercised by some test (as datasette does)."""
import inspect
import pathlib
import re

import pytest

from basic_plugin.host import hookspecs

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("llava_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = (ROOT / "INTEGRATION.md").read_text(encoding="utf-8")
    assert re.search(rf"^### {hook}$", doc, re.M), f"INTEGRATION.md has no '### {hook}' section"
    signature = inspect.signature(getattr(hookspecs, hook))
    for param in signature.parameters:
        assert param in doc.split(f"### {hook}")[1].split("###")[0], f"{hook}: parameter {param} undocumented"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    users = [p.name for p in (ROOT / "tests").glob("test_*.py")
             if p.name != pathlib.Path(__file__).name and re.search(rf"\b{hook}\b", p.read_text(encoding="utf-8"))]
    assert users, f"no test mentions {hook}"

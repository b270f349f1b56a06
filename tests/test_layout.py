"""The package's folders are its architecture: imports point down only (lab -> basic -> api -> host),
no module imports itself back through others (function-level imports included), and a plugin (BASIC,
the example) sees the host only through ``basic_plugin.api``."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "basic_plugin"
LAYERS = {"host": 0, "api": 1, "basic": 2, "lab": 3}
#: top-level modules: the entry forwarders and the CLI may import anything; ``api`` is a layer of its own
TOP = {"__init__", "train", "train_mem", "cli"}
#: what a plugin may import of basic-llava (besides its own package)
PLUGIN_API = "basic_plugin.api"


def imported_modules(path: Path):
    """Every module ``path`` imports, at any depth of the file (functions included)."""
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


def modules(package: Path = PACKAGE):
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict:
    """module -> the package's modules it imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    names = {module_name(p, package): p for p in modules(package)}

    def resolve(name):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in names:
                return ".".join(parts[:end])
        return None

    return {name: {r for m in imported_modules(path) if (r := resolve(m)) is not None and r != name}
            for name, path in names.items()}


def import_circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_lives_in_a_layer():
    loose = [p.relative_to(PACKAGE) for p in modules()
             if p.parent == PACKAGE and p.stem not in TOP and p.stem not in LAYERS]
    assert not loose, f"modules outside host/, api.py, basic/ and lab/: {loose}"


@pytest.mark.parametrize("path", [p for p in modules() if p.parent != PACKAGE or p.stem in LAYERS],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = LAYERS[path.relative_to(PACKAGE).with_suffix("").parts[0]]
    upward = [m for m in imported_modules(path) if (layer_of(m) or -1) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports a higher layer: {upward}"


def test_no_import_circle():
    assert import_circles(import_graph()) == []


def _plugin_imports(path: Path, own_package: str | None):
    """The basic-llava modules ``path`` imports that are neither the plugin API nor its own package."""
    def allowed(module):
        return any(module == p or module.startswith(p + ".") for p in (PLUGIN_API, own_package) if p)

    return sorted({m for m in imported_modules(path) if m.split(".")[0] == "basic_plugin" and not allowed(m)})


@pytest.mark.parametrize("path", sorted((PACKAGE / "basic").rglob("*.py")), ids=lambda p: p.name)
def test_the_method_sees_the_host_only_through_the_api(path):
    """BASIC is a plugin like any other: of basic-llava it imports ``basic_plugin.api`` and itself."""
    assert _plugin_imports(path, "basic_plugin.basic") == [], path.name


def test_the_example_plugin_imports_only_the_api():
    example = ROOT / "examples" / "projector_norm_plugin.py"
    assert PLUGIN_API in set(imported_modules(example))
    assert _plugin_imports(example, None) == []


#: the host's process-wide state, as basic_plugin/host/__init__.py lists it (module -> names)
HOST_STATE = {"plugins": {"pm", "_loaded", "_undo_trace"}, "integration": {"_originals"}, "cpu": {"_undo_stack"},
              "binding": {"_bindings"}, "forward": {"_cache"}}


def module_state(path: Path) -> set:
    """Names ``path`` rebinds from functions (``global``) or binds at module level to an empty container,
    a weak map or a plugin manager."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            empty = isinstance(value, (ast.Dict, ast.List, ast.Set)) and not (
                value.keys if isinstance(value, ast.Dict) else value.elts)
            built = isinstance(value, ast.Call) and (getattr(value.func, "attr", None) or getattr(value.func, "id", None)) \
                in {"dict", "list", "set", "WeakKeyDictionary", "WeakValueDictionary", "PluginManager"}
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if empty or built:
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def set_from_outside(path: Path, package: str = "basic_plugin.host") -> set:
    """``(module, name)`` for each ``module.name = ...`` in ``path`` on a module of ``package`` it imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            imported.update({a.asname or a.name: a.name for a in node.names})
    return {(imported[t.value.id], t.attr) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in imported}


def test_the_hosts_module_level_state_is_the_listed_one():
    found = {p.stem: state for p in modules(PACKAGE / "host") if (state := module_state(p))}
    for path in modules(PACKAGE / "host"):
        for module, name in set_from_outside(path):
            found.setdefault(module, set()).add(name)
    assert found == HOST_STATE
    doc = (PACKAGE / "host" / "__init__.py").read_text(encoding="utf-8")
    assert all(f"``{module}.{name}``" in doc for module, names in HOST_STATE.items() for name in names)


def test_the_state_checker_sees_a_new_global(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import weakref\nCONSTANT = {'a': 1}\n_seen = []\n_map = weakref.WeakKeyDictionary()\n"
                    "_flag = False\n\ndef f():\n    global _flag\n    _flag = True\n")
    assert module_state(path) == {"_seen", "_map", "_flag"}
    other = tmp_path / "n.py"
    other.write_text("from basic_plugin.host import refusal\n\ndef f():\n    refusal.exit_at_refusal = True\n")
    assert set_from_outside(other) == {("refusal", "exit_at_refusal")}


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from basic_plugin.lab.tiny import build_tiny_llava\nimport basic_plugin.basic.losses\n"
                   "from basic_plugin import hookimpl\nfrom basic_plugin.host.binding import bind\n")
    assert [m for m in imported_modules(bad) if layer_of(m) == 3] and \
        [m for m in imported_modules(bad) if layer_of(m) == 2]
    assert _plugin_imports(bad, "basic_plugin.basic") == [
        "basic_plugin", "basic_plugin.hookimpl", "basic_plugin.host.binding", "basic_plugin.host.binding.bind",
        "basic_plugin.lab.tiny", "basic_plugin.lab.tiny.build_tiny_llava"]
    assert _plugin_imports(bad, "basic_plugin.lab") == [
        "basic_plugin", "basic_plugin.basic.losses", "basic_plugin.hookimpl", "basic_plugin.host.binding",
        "basic_plugin.host.binding.bind"]


def test_the_checker_sees_a_circle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (package / "b.py").write_text("def g():\n    from pkg import c\n    return c.h()\n")
    (package / "c.py").write_text("import pkg.a\n\ndef h():\n    return 1\n")
    (package / "d.py").write_text("import pkg.a\n")
    assert import_circles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_installed_entry_points_hold_no_lab_code():
    """A LLaVA that loads the ``llava`` entry points (every ``load_pretrained_model`` on a patched LLaVA) gets the
    host and BASIC, never the lab: its plugins (the DINOv2 tower) register only where the lab runs."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    llava = project["entry-points"]["llava"]
    assert llava == {"basic": "basic_plugin.basic.plugin", "basic-llava": "basic_plugin.host.native"}

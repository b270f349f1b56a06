"""Build ``0001-plugin-hooks.patch`` from its template and basic-llava's hook specifications.

The two hooks LLaVA itself calls (``LLAVA_HOOKS``) are specified once, in
``basic_plugin/host/hookspecs.py``; the patch's ``llava/plugins.py`` carries them verbatim
(decorator, signature, docstring), so the host's plugin manager and LLaVA's agree on every
hook both of them know. Inputs, all in this folder:

- ``template/plugins.py.in``: ``llava/plugins.py`` with an ``@HOOKSPECS@`` line where the specs go;
- ``template/0001-plugin-hooks.patch.in``: the patch (``git format-patch --zero-commit -U2``
  form: header, commit message, the two fixed hunks for LLaVA's own files) with
  ``@DIFFSTAT@`` and ``@PLUGINS_PY_DIFF@`` where the generated parts go.

The output depends on nothing else (no clock, no git), so it is reproducible::

    python patches/build_patch.py            # rewrite patches/0001-plugin-hooks.patch
    python patches/build_patch.py --check    # exit 1 when the committed patch is stale

``tests/test_patches.py`` runs the check, so the specs cannot drift apart.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
from pathlib import Path

PATCHES = Path(__file__).resolve().parent
REPO_ROOT = PATCHES.parent
HOOKSPECS = REPO_ROOT / "basic_plugin" / "host" / "hookspecs.py"
PLUGINS_TEMPLATE = PATCHES / "template" / "plugins.py.in"
PATCH_TEMPLATE = PATCHES / "template" / "0001-plugin-hooks.patch.in"
OUTPUT = PATCHES / "0001-plugin-hooks.patch"

#: The hooks LLaVA calls itself, in the order ``llava/plugins.py`` declares them.
LLAVA_HOOKS = ("llava_train_classes", "llava_build_vision_tower")
#: ``git format-patch``'s diffstat width (MAIL_DEFAULT_WRAP).
STAT_WIDTH = 72


def hookspec_sources(path: Path = HOOKSPECS, names=LLAVA_HOOKS) -> dict[str, str]:
    """name -> the spec's source text (decorators through the end of the docstring), as written."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = "".join(lines[first - 1:node.end_lineno]).rstrip("\n")
    missing = [name for name in names if name not in found]
    if missing:
        raise SystemExit(f"{path}: no hook specification for {', '.join(missing)}")
    return {name: found[name] for name in names}


def plugins_py() -> str:
    """The patch's ``llava/plugins.py``."""
    template = PLUGINS_TEMPLATE.read_text()
    if template.count("@HOOKSPECS@\n") != 1:
        raise SystemExit(f"{PLUGINS_TEMPLATE}: needs exactly one '@HOOKSPECS@' line")
    return template.replace("@HOOKSPECS@\n", "\n\n\n".join(hookspec_sources().values()) + "\n")


def blob_id(content: str) -> str:
    """The git object id of a file with this content (``git hash-object``)."""
    data = content.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def new_file_diff(path: str, content: str) -> str:
    lines = content.splitlines(keepends=True)
    return (f"diff --git a/{path} b/{path}\nnew file mode 100644\nindex 0000000..{blob_id(content)[:7]}\n"
            f"--- /dev/null\n+++ b/{path}\n@@ -0,0 +1,{len(lines)} @@\n" + "".join("+" + l for l in lines))


def _scale(count: int, width: int, max_change: int) -> int:
    return 0 if count == 0 else 1 + (count * (width - 1) // max_change)


def diffstat(diffs: str) -> str:
    """The stat block ``git format-patch`` writes for these diffs (git's diff.c, --stat)."""
    files = []  # (path, added, removed, created)
    for section in re.split(r"^(?=diff --git )", diffs, flags=re.M):
        match = re.match(r"diff --git a/(\S+) b/", section)
        if not match:
            continue
        body = section.splitlines()
        added = sum(1 for l in body if l.startswith("+") and not l.startswith("+++ "))
        removed = sum(1 for l in body if l.startswith("-") and not l.startswith("--- "))
        files.append((match.group(1), added, removed, "\nnew file mode 100644\n" in section))
    max_len = max(len(path) for path, *_ in files)
    max_change = max(a + r for _, a, r, _ in files)
    number_width = len(str(max_change))
    width = max(STAT_WIDTH, 16 + 6 + number_width)
    graph_width, name_width = max_change, max_len
    if name_width + number_width + 6 + graph_width > width:
        if graph_width > width * 3 // 8 - number_width - 6:
            graph_width = max(width * 3 // 8 - number_width - 6, 6)
        if name_width > width - number_width - 6 - graph_width:
            name_width = width - number_width - 6 - graph_width
        else:
            graph_width = width - number_width - 6 - name_width
    out = []
    for path, added, removed, _ in files:
        if len(path) > name_width:  # git elides the front of long names, up to a "/"
            tail = path[len(path) - max(name_width - 3, 0):]
            path = "..." + (tail[tail.index("/"):] if "/" in tail else tail)
        plus, minus = added, removed
        if max_change > graph_width:
            total = _scale(added + removed, graph_width, max_change)
            plus = _scale(added, graph_width, max_change) if added else 0
            minus = total - plus if removed else 0
        out.append(f" {path:<{name_width}} | {added + removed:>{number_width}} {'+' * plus}{'-' * minus}".rstrip())
    total_added, total_removed = sum(f[1] for f in files), sum(f[2] for f in files)
    summary = f" {len(files)} file{'s' if len(files) != 1 else ''} changed"
    if total_added:
        summary += f", {total_added} insertion{'s' if total_added != 1 else ''}(+)"
    if total_removed:
        summary += f", {total_removed} deletion{'s' if total_removed != 1 else ''}(-)"
    out.append(summary)
    out += [f" create mode 100644 {path}" for path, *_, created in files if created]
    return "\n".join(out)


def build() -> str:
    """The full text of ``0001-plugin-hooks.patch``."""
    template = PATCH_TEMPLATE.read_text()
    for marker in ("@DIFFSTAT@", "@PLUGINS_PY_DIFF@\n"):
        if template.count(marker) != 1:
            raise SystemExit(f"{PATCH_TEMPLATE}: needs exactly one {marker.strip()!r}")
    text = template.replace("@PLUGINS_PY_DIFF@\n", new_file_diff("llava/plugins.py", plugins_py()))
    diffs = text[text.index("\ndiff --git ") + 1:text.rindex("\n-- \n") + 1]
    return text.replace("@DIFFSTAT@", diffstat(diffs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed patch, write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python patches/build_patch.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

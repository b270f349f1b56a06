"""The module-level plugin manager and how plugins are found.

Plugins come only from installed entry points in the ``llava`` group (BASIC
included, registered exactly like a third-party plugin). Environment variables:

- ``LLAVA_PLUGINS``: comma-separated allow-list of entry-point names; unset means all.
- ``LLAVA_PLUGINS_BLOCK``: comma-separated names never loaded.
- ``LLAVA_PLUGINS_TRACE``: ``1`` prints every hook call and result to stderr.
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import pluggy

from basic_plugin import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT
ALLOW_ENV = "LLAVA_PLUGINS"
BLOCK_ENV = "LLAVA_PLUGINS_BLOCK"
TRACE_ENV = "LLAVA_PLUGINS_TRACE"

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)

_loaded = False
_undo_trace = None


def _names(env: str) -> set[str] | None:
    raw = os.environ.get(env)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def available_entry_points():
    """The installed ``llava`` entry points, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def blocked_names() -> set[str]:
    """Entry-point names that the environment keeps from loading."""
    blocked = set(_names(BLOCK_ENV) or ())
    allowed = _names(ALLOW_ENV)
    if allowed is not None:
        blocked |= set(available_entry_points()) - allowed
    return blocked


def load_plugins() -> pluggy.PluginManager:
    """Load the installed plugins once, honouring the allow/block/trace variables."""
    global _loaded, _undo_trace
    if _loaded:
        return pm
    _loaded = True
    for name in blocked_names():
        pm.set_blocked(name)
    for name, ep in sorted(available_entry_points().items()):
        if pm.is_blocked(name) or pm.get_plugin(name) is not None:
            continue
        pm.register(ep.load(), name=name)
    pm.check_pending()
    if os.environ.get(TRACE_ENV, "") not in ("", "0") and _undo_trace is None:
        def before(hook_name, hook_impls, kwargs):
            print(f"[llava-plugins] {hook_name} -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):
            print(f"[llava-plugins] {hook_name} returned {outcome.get_result()!r}"[:400], file=sys.stderr)

        _undo_trace = pm.add_hookcall_monitoring(before, after)
    return pm


def reset_plugins() -> None:
    """Unregister everything (tests, re-reading the environment)."""
    global _loaded, _undo_trace
    for name, plugin in list(pm.list_name_plugin()):
        if plugin is None:
            pm.unblock(name)
        else:
            pm.unregister(plugin=plugin, name=name)
    if _undo_trace is not None:
        _undo_trace()
        _undo_trace = None
    _loaded = False


def has_auxiliary_losses() -> bool:
    """True when some loaded plugin implements ``llava_auxiliary_losses``."""
    return bool(pm.hook.llava_auxiliary_losses.get_hookimpls())

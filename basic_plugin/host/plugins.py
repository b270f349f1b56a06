"""The module-level plugin manager and how plugins are found.

Plugins come only from installed entry points in the ``llava`` group (BASIC
included, registered exactly like a third-party plugin). Environment variables:

- ``LLAVA_PLUGINS``: comma-separated allow-list of entry-point names; unset means all.
- ``LLAVA_PLUGINS_BLOCK``: comma-separated names never loaded.
- ``LLAVA_PLUGINS_TRACE``: ``1`` prints every hook call and result to stderr.

A name in either list that no installed entry point has is almost always a typo (in the
allow-list it silently keeps every plugin out): :func:`load_plugins` warns with
:class:`UnknownPluginWarning`, naming it and the installed names, and ``basic-llava doctor``
counts it as a problem. A plugin that fails to import is left out with one
:class:`PluginLoadWarning` naming it (a patched LLaVA's manager does the same), and the others load.

The host's own plugin (:data:`BUILTIN_PLUGINS`: ``basic-llava``, the answer to a patched
LLaVA's ``llava_train_classes``) is part of the host, not a plugin a user picks: this manager
registers it by module name on every load, whatever the two lists say (as ``llm`` does with
its default plugins). It is also the entry point ``basic-llava``, for a patched LLaVA's own
manager, which applies the lists to it like to any other entry point: there
``LLAVA_PLUGINS`` must name it (``basic-llava doctor`` says so).
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from basic_plugin.host import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT
ALLOW_ENV = "LLAVA_PLUGINS"
BLOCK_ENV = "LLAVA_PLUGINS_BLOCK"
TRACE_ENV = "LLAVA_PLUGINS_TRACE"
#: the host's own plugins, by name: registered on every load, never kept out by the variables
BUILTIN_PLUGINS = {"basic-llava": "basic_plugin.host.native"}

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


class UnknownPluginWarning(UserWarning):
    """``LLAVA_PLUGINS`` / ``LLAVA_PLUGINS_BLOCK`` names a plugin that is not installed."""


class PluginLoadWarning(UserWarning):
    """An installed plugin failed to import: it is left out, the other plugins and LLaVA go on."""


def load_failure_message(name: str, value: str, error: BaseException) -> str:
    """The one line both managers (this one and a patched LLaVA's) warn with for a plugin that fails to load."""
    return f"llava plugin {name!r} ({value}) failed to load and is left out: {error!r}"


@dataclass(frozen=True)
class PluginEnvironment:
    """What the environment variables make of the installed plugins."""

    installed: dict[str, str]  #: entry-point name -> its module (``ep.value``)
    allow: frozenset[str] | None  #: ``LLAVA_PLUGINS`` as names; None when unset (all allowed)
    block: frozenset[str]  #: ``LLAVA_PLUGINS_BLOCK`` as names
    enabled: frozenset[str] = field(default_factory=frozenset)  #: installed names that load
    blocked: frozenset[str] = field(default_factory=frozenset)  #: installed names kept out
    unknown: dict[str, tuple[str, ...]] = field(default_factory=dict)  #: variable -> names not installed

    def unknown_message(self) -> str | None:
        """One line naming every unknown name and the installed ones; None when there is none."""
        if not self.unknown:
            return None
        parts = "; ".join(f"{env}={','.join(names)}" for env, names in self.unknown.items())
        installed = ", ".join(sorted(self.installed)) or "(none)"
        return (f"unknown plugin name(s) in {parts} (installed plugins: {installed}); "
                "check the spelling" + (f" - an unknown name in {ALLOW_ENV} keeps out every plugin it "
                                        "does not name" if ALLOW_ENV in self.unknown else ""))


def plugin_environment() -> PluginEnvironment:
    """Installed, enabled, blocked and unknown plugin names under ``LLAVA_PLUGINS*``."""
    installed = {name: ep.value for name, ep in available_entry_points().items()}
    allow, block = _names(ALLOW_ENV), set(_names(BLOCK_ENV) or ())
    blocked = {n for n in installed if n in block or (allow is not None and n not in allow)}
    unknown = {env: tuple(sorted(names - set(installed)))
               for env, names in ((ALLOW_ENV, allow or set()), (BLOCK_ENV, block)) if names - set(installed)}
    return PluginEnvironment(installed=installed, allow=None if allow is None else frozenset(allow),
                             block=frozenset(block), enabled=frozenset(set(installed) - blocked),
                             blocked=frozenset(blocked), unknown=unknown)


def blocked_names() -> set[str]:
    """Names this manager keeps from loading: the environment's (``LLAVA_PLUGINS_BLOCK`` as given), but
    never a built-in plugin's."""
    return _kept_out(plugin_environment())


def _kept_out(env: PluginEnvironment) -> set[str]:
    return (set(env.blocked) | set(env.block)) - set(BUILTIN_PLUGINS)


def load_plugins() -> pluggy.PluginManager:
    """Load the host's own plugins and the installed ones once, honouring the allow/block/trace variables."""
    global _loaded, _undo_trace
    if _loaded:
        return pm
    _loaded = True
    env = plugin_environment()
    message = env.unknown_message()
    if message:
        warnings.warn(message, UnknownPluginWarning, stacklevel=2)
    for name, module in BUILTIN_PLUGINS.items():  # by name, as an entry point is: the module imports the host
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(module), name=name)
    for name in _kept_out(env):
        pm.set_blocked(name)
    for name, ep in sorted(available_entry_points().items()):
        if pm.is_blocked(name) or pm.get_plugin(name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin is left out, as a patched LLaVA does
            warnings.warn(load_failure_message(name, ep.value, error), PluginLoadWarning, stacklevel=2)
            continue
        pm.register(plugin, name=name)
    pm.check_pending()
    if os.environ.get(TRACE_ENV, "") not in ("", "0") and _undo_trace is None:
        def before(hook_name, hook_impls, kwargs):
            print(f"[llava-plugins] {hook_name} -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):
            print(f"[llava-plugins] {hook_name} returned {outcome.get_result()!r}"[:400], file=sys.stderr)

        _undo_trace = pm.add_hookcall_monitoring(before, after)
    return pm


def failed_plugins() -> list[str]:
    """Installed plugins that loading left out because they failed to import (not blocked, not registered)."""
    if not _loaded:
        return []
    return sorted(n for n in available_entry_points() if not pm.is_blocked(n) and pm.get_plugin(n) is None)


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

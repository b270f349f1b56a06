"""Vision towers that the lab offers to LLaVA through ``llava_build_vision_tower``.

- :mod:`basic_plugin.lab.towers.dinov2`: DINOv2 (``Dinov2Model`` folders).

The lab's plugins are not ``llava`` entry points of the installed package: a LLaVA that
loads checkpoints (``load_pretrained_model``) never consults them. They are registered
with the host's plugin manager only in a process that runs the lab
(:func:`register_lab_plugins`: the demo, its training entry ``python -m
basic_plugin.lab.train``, the lens, the benchmark, the sweep, ``basic-llava channels``).
"""
from __future__ import annotations

import importlib

#: the lab's plugins: name -> module (registered by :func:`register_lab_plugins`, never as entry points)
LAB_PLUGINS = {"dinov2": "basic_plugin.lab.towers.dinov2"}


def register_lab_plugins():
    """Load the installed plugins (:func:`basic_plugin.host.plugins.load_plugins`), then register the lab's
    with the same manager, in this process only (a name kept out by ``LLAVA_PLUGINS_BLOCK`` stays out);
    idempotent. Returns the manager."""
    from basic_plugin.host.plugins import load_plugins

    manager = load_plugins()
    for name, module in LAB_PLUGINS.items():
        if manager.get_plugin(name) is None and not manager.is_blocked(name):
            manager.register(importlib.import_module(module), name=name)
    return manager


def apply_lab_host() -> None:
    """The plugin host's seams (:func:`basic_plugin.host.integration.apply_plugin_host`) with the lab's plugins
    registered first, so its towers build wherever LLaVA builds one."""
    from basic_plugin.host.integration import apply_plugin_host

    register_lab_plugins()
    apply_plugin_host()

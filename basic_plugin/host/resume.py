"""The plugin settings a checkpoint was trained with, saved next to it, and checked when a run resumes.

LLaVA resumes by itself from the last ``checkpoint-*`` of ``--output_dir``, whatever flags the new
command gives: a resume with other plugin settings than the checkpoint's would go on silently with
a different method. With a plugin on, every checkpoint gets ``plugin_settings.json`` (plain JSON:
every flag of every installed plugin, as trained); a run about to resume compares its own with the
last checkpoint's and is refused, naming both, unless ``--allow_changed_plugin_settings True``.
A checkpoint without the file was saved with no plugin on; resuming it with one on is a change too.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from basic_plugin.host.refusal import Refusal

SETTINGS_FILE = "plugin_settings.json"


def plugin_settings(training_args, plugin_classes) -> dict:
    """Every flag of the plugins' argument classes with its value in this run (flag name -> value)."""
    return {f.name: getattr(training_args, f.name) for cls in plugin_classes for f in dataclasses.fields(cls)}


def write_settings(folder: str, settings: dict) -> None:
    """``folder/plugin_settings.json`` (a checkpoint's folder), written atomically."""
    from basic_plugin.host.preflight import write_json

    write_json(os.path.join(folder, SETTINGS_FILE), dict(sorted(settings.items())))


def last_checkpoint(output_dir) -> Optional[str]:
    """The checkpoint LLaVA's ``train()`` resumes from (the highest ``checkpoint-N``), if any."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir)


def check_resume(training_args, plugin_classes, *, active: bool) -> None:
    """Refuse resuming a checkpoint whose plugin settings differ from this run's (``active``: a plugin is on)."""
    checkpoint = last_checkpoint(getattr(training_args, "output_dir", None))
    if checkpoint is None or getattr(training_args, "allow_changed_plugin_settings", False):
        return
    path = os.path.join(checkpoint, SETTINGS_FILE)
    current = plugin_settings(training_args, plugin_classes)
    if not os.path.isfile(path):
        if not active:
            return  # no plugin then, none now
        changed = ", ".join(f"--{k} {v}" for k, v in current.items()
                            if v != _default(plugin_classes, k))
        raise Refusal(f"--output_dir {training_args.output_dir}: the run would resume {checkpoint}, saved with no "
                      f"plugin on (no {SETTINGS_FILE}), with {changed}; allowed: a fresh --output_dir, or "
                      "--allow_changed_plugin_settings True to resume with these settings")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not differ:
        return
    then = ", ".join(f"--{k} {saved.get(k, '(absent)')}" for k in differ)
    now = ", ".join(f"--{k} {current.get(k, '(absent)')}" for k in differ)
    raise Refusal(f"--output_dir {training_args.output_dir}: the run would resume {checkpoint}, trained with {then}; "
                  f"this run has {now}; allowed: the checkpoint's settings, a fresh --output_dir, or "
                  "--allow_changed_plugin_settings True to resume with the new ones")


def _default(plugin_classes, name):
    for cls in plugin_classes:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.default
    return None

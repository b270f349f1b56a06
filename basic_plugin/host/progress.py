"""Training progress as JSON lines, for whoever launched the run.

With ``BASIC_LLAVA_PROGRESS=<path>`` in the environment, :func:`progress_callback` returns a
``TrainerCallback`` that appends one JSON object per log event of the main process to that file
and flushes it: ``{"step": <global step>, "max_steps": <planned steps>, <logged values>...}``.
Logged values that are not finite numbers are written as ``null`` (the file stays strict
JSON). Without the variable there is no callback. A launcher reads the file while it waits
(:mod:`basic_plugin.lab.launch`), instead of parsing printed dictionaries.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

PROGRESS_ENV = "BASIC_LLAVA_PROGRESS"


def _plain(value):
    """A JSON value for a logged value (numbers from tensors and numpy too; non-finite -> None)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):  # not a one-element array
            return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


class ProgressCallback(TrainerCallback):
    """Appends ``{"step", "max_steps", **logs}`` to ``path`` on every log event of the main process."""

    def __init__(self, path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "max_steps": state.max_steps}
        record.update((key, _plain(value)) for key, value in (logs or {}).items() if key not in record)
        line = json.dumps(record, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def progress_callback() -> Optional[ProgressCallback]:
    """The progress callback when ``BASIC_LLAVA_PROGRESS`` names a file, else None."""
    path = os.environ.get(PROGRESS_ENV)
    return ProgressCallback(path) if path else None

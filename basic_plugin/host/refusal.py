"""The one kind of error a user's settings or data get: a message, not a traceback.

``python -m basic_plugin.train`` prints a :class:`Refusal` as ``error: <message>`` and
exits with status 2 (set ``BASIC_LLAVA_TRACEBACK=1`` to see where it was raised).
It is a ``ValueError``, so code that catches LLaVA's own argument errors still does.
"""
from __future__ import annotations

TRACEBACK_ENV = "BASIC_LLAVA_TRACEBACK"


class Refusal(ValueError):
    """A setting or input the run cannot use; the message names it and what is allowed."""


class RunStopped(RuntimeError):
    """A guard of the host ended training on purpose; the message says why and what was saved."""

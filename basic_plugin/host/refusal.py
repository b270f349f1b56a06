"""The one kind of error a user's settings or data get: a message, not a traceback.

``python -m basic_plugin.train`` prints a :class:`Refusal` as ``error: <message>`` and
exits with status 2 (set ``BASIC_LLAVA_TRACEBACK=1`` to see where it was raised).
It is a ``ValueError``, so code that catches LLaVA's own argument errors still does.
"""
from __future__ import annotations

TRACEBACK_ENV = "BASIC_LLAVA_TRACEBACK"


class Refusal(ValueError):
    """A setting or input the run cannot use; the message names it and what is allowed."""


#: set by an entry point that cannot catch (a patched LLaVA's own ``train()``): refusals exit at once
exit_at_refusal = False


def exit_with(error: Refusal):
    """Print ``error: <message>`` and exit with status 2, unless a traceback was asked for."""
    import os
    import sys

    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise error
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


class RunStopped(RuntimeError):
    """A guard of the host ended training on purpose; the message says why and what was saved."""

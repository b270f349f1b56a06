"""The one home for refusals: a setting or input the run cannot use ends the process as one
line ``error: <message>`` on stderr with exit status 2, never a traceback.

- :class:`Refusal`: what the host and plugins raise (a ``ValueError``, so code that catches
  LLaVA's own argument errors still does); the message names the setting and what is allowed;
- :func:`print_refusal`: the one function that writes that line; it returns the exit status, for
  commands whose ``main()`` returns one;
- :func:`exit_with`: :func:`print_refusal`, then exit (``BASIC_LLAVA_TRACEBACK=1``: raise instead,
  to see where the refusal came from);
- :func:`refusals_exit`: the block an entry point runs in, whose :class:`Refusal` ends the
  process through :func:`exit_with`;
- :func:`refuse`: an error found while LLaVA parses the flags, raised as a :class:`Refusal`
  for the entry point around ``train()``, or ended at once where no entry point of ours runs
  around it (a patched LLaVA's own ``train_mem.py``).

:class:`RunStopped` is not a refusal: a guard ended a run that had started (exit status 3);
:class:`RunInterrupted` is one ended by Ctrl-C (exit status 130).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, NoReturn

TRACEBACK_ENV = "BASIC_LLAVA_TRACEBACK"
#: the exit status of every refusal
EXIT_STATUS = 2


class Refusal(ValueError):
    """A setting or input the run cannot use; the message names it and what is allowed."""


class RunStopped(RuntimeError):
    """A guard of the host ended training on purpose; the message says why and what was saved."""


class RunInterrupted(RunStopped):
    """Ctrl-C ended training at the end of a step; the message says where the checkpoint is (exit status 130)."""


def print_refusal(error) -> int:
    """Print ``error: <message>`` on stderr; return the exit status of a refusal (2)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_STATUS


def exit_with(error: BaseException) -> NoReturn:
    """End the process the one way a refusal does (:func:`print_refusal`, exit status 2), unless a
    traceback was asked for (``BASIC_LLAVA_TRACEBACK=1``: ``error`` is raised)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise error
    raise SystemExit(print_refusal(error)) from None


@contextlib.contextmanager
def refusals_exit() -> Iterator[None]:
    """Run the block; a :class:`Refusal` raised in it ends the process through :func:`exit_with`."""
    try:
        yield
    except Refusal as error:
        exit_with(error)


def refuse(error: ValueError, *, exit_now: bool) -> NoReturn:
    """``error`` (a plugin's ``ValueError`` too) as a :class:`Refusal`: raised, or with ``exit_now``
    (no entry point of ours will catch it) the process ends here through :func:`exit_with`."""
    refusal = error if isinstance(error, Refusal) else Refusal(str(error))
    if exit_now:
        exit_with(refusal)
    raise refusal

"""What every ``basic-llava`` command does the same way.

- :class:`CommandParser`: an ``ArgumentParser`` whose usage names the command (``usage:
  basic-llava lens ...``) and whose help is plain text (docstrings' reST markup such as
  ````x```` and ``:mod:`x``` shown as ``x``);
- :func:`training_parser`: the parser LLaVA's ``train()`` builds (its flags, the host's and
  the plugins'), named for a command, for ``basic-llava train --help`` and ``basic-llava
  preflight``;
- :func:`missing_dependency` and :func:`require_packages`: a missing optional package as one
  :class:`~basic_plugin.host.refusal.Refusal` line with the fix (at once, or before a
  command starts its work).
"""
from __future__ import annotations

import argparse
import importlib.util
import re

from basic_plugin.host.refusal import Refusal

PROGRAM = "basic-llava"
_MARKUP = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``")
#: packages the lab's commands import that the wheel does not require -> what to install (the ``lab`` extra)
OPTIONAL_PACKAGES = {"matplotlib": "matplotlib", "onnx": "onnx", "onnxruntime": "onnxruntime", "gguf": "gguf",
                     "ml_dtypes": "ml_dtypes", "PIL": "pillow"}


def plain(text: str) -> str:
    """``text`` without reST markup: ````x```` and ``:role:`x``` become ``x``."""
    return _MARKUP.sub(lambda m: m.group(1) or m.group(2), text)


def summary(doc: str | None) -> str | None:
    """The first paragraph of a docstring, in plain text on one line."""
    if not doc:
        return None
    return plain(" ".join(doc.strip().split("\n\n", 1)[0].split()))


class CommandParser(argparse.ArgumentParser):
    """``ArgumentParser`` for ``basic-llava <command>``: its usage names the command, its help is plain text."""

    def __init__(self, command: str | None = None, **kwargs):
        kwargs.setdefault("prog", f"{PROGRAM} {command}" if command else PROGRAM)
        super().__init__(**kwargs)

    def format_help(self) -> str:
        return plain(super().format_help())

    def format_usage(self) -> str:
        return plain(super().format_usage())


def training_parser(command: str, description: str | None = None):
    """``HfArgumentParser`` over LLaVA's three argument classes with the host's (and so every plugin's flags),
    as LLaVA's ``train()`` builds it, named ``basic-llava <command>``. Installs the host's seams; starts nothing."""
    import transformers

    from basic_plugin.host.integration import apply_plugin_host

    apply_plugin_host()
    import llava.train.train as llava_train

    class TrainingParser(transformers.HfArgumentParser):
        def format_help(self) -> str:
            return plain(super().format_help())

    return TrainingParser((llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments),
                          prog=f"{PROGRAM} {command}", description=summary(description))


def missing_dependency(command: str, error: ModuleNotFoundError) -> Refusal | None:
    """The refusal for an optional package ``command`` needs and cannot import; None for any other module."""
    top = (error.name or "").split(".")[0]
    if top not in OPTIONAL_PACKAGES:
        return None
    package = OPTIONAL_PACKAGES[top]
    return Refusal(f"{PROGRAM} {command} needs {package}, which is not installed; allowed: pip install {package} "
                   f"(or every package the lab's commands use: pip install \"basic-llava[lab]\")")


def require_packages(command: str, modules) -> None:
    """Refuse ``command`` up front when an optional package it will import is missing (not after an hour's work)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise missing_dependency(command, ModuleNotFoundError(f"No module named {module!r}", name=module))

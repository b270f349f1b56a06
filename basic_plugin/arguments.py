"""Plugin flags for LLaVA's ``train()``: one TrainingArguments subclass built from the plugins.

``train()`` parses ``(ModelArguments, DataArguments, TrainingArguments)``. The host
rebinds ``TrainingArguments`` in ``llava.train.train`` to a subclass that adds
every field of every plugin's argument dataclass, so plugin flags parse, show
in ``--help``, and arrive as attributes of ``training_args``.
"""
from __future__ import annotations

import dataclasses
import sys
import typing

from basic_plugin.plugins import load_plugins, pm

CLASS_NAME = "PluginTrainingArguments"


def plugin_argument_classes() -> list[type]:
    """The argument dataclasses of the loaded plugins, in registration order."""
    classes = []
    for result in pm.hook.llava_plugin_arguments():
        for cls in result or ():
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"llava_plugin_arguments must return dataclasses, got {cls!r}")
            classes.append(cls)
    return classes


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise TypeError(f"plugin flag {f.name!r} needs a default")
    kwargs = {"metadata": dict(f.metadata)}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    else:
        kwargs["default_factory"] = f.default_factory
    return dataclasses.field(**kwargs)


def build_training_arguments(base: type, plugin_classes: list[type] | None = None) -> type:
    """Return ``base`` extended with the fields of ``plugin_classes`` (default: the loaded plugins').

    ``__post_init__`` runs the plugins' ``llava_validate_arguments`` so that bad
    settings stop the run before the model loads.
    """
    if plugin_classes is None:
        load_plugins()
        plugin_classes = plugin_argument_classes()
    taken = {f.name: base.__name__ for f in dataclasses.fields(base)}
    new_fields = []
    for cls in plugin_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in taken:
                raise ValueError(f"plugin flag --{f.name} of {cls.__name__} clashes with {taken[f.name]}")
            taken[f.name] = cls.__name__
            new_fields.append((f.name, hints[f.name], _copy_field(f)))

    def __post_init__(self):
        base.__post_init__(self)
        pm.hook.llava_validate_arguments(training_args=self)

    cls = dataclasses.make_dataclass(
        CLASS_NAME, new_fields, bases=(base,), namespace={"__post_init__": __post_init__}
    )
    cls.__module__ = __name__
    cls.__qualname__ = CLASS_NAME
    setattr(sys.modules[__name__], CLASS_NAME, cls)  # so pickling training_args.bin finds it
    return cls


def __getattr__(name):
    """Rebuild the class on demand, e.g. when a saved ``training_args.bin`` is unpickled."""
    if name == CLASS_NAME:
        from llava.train.train import TrainingArguments

        base = getattr(TrainingArguments, "_llava_plugin_base", TrainingArguments)
        return build_training_arguments(base)
    raise AttributeError(name)

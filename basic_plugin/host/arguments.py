"""Plugin flags for LLaVA's ``train()``: argument classes built from the plugins.

``train()`` parses ``(ModelArguments, DataArguments, TrainingArguments)`` in that
order. The host rebinds the three in ``llava.train.train``: the first two are
recorded as they are built, and ``TrainingArguments`` gains every field of every
plugin's argument dataclass plus the host's own, then runs the validation hooks
with all three, so bad settings stop the run before the model loads. The data
pre-flight is handed in by whoever builds the class (:mod:`basic_plugin.host.integration`
hands :func:`basic_plugin.host.preflight.run_preflight`): parsing never imports it.

What one parse records (the ModelArguments and DataArguments instances, for the validation
hooks) lives in a :class:`ParseRecord` that the three classes of one host installation
share, not in this module. A refusal found while parsing is a
:class:`basic_plugin.host.refusal.Refusal`, raised for the entry point to print, or, for
the classes a patched LLaVA's own entry uses (``exit_on_refusal``), printed at once
(:func:`basic_plugin.host.refusal.refuse`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import typing
from typing import Callable

from basic_plugin.host.pitfalls import check_llava_pitfalls
from basic_plugin.host.plugins import load_plugins, pm
from basic_plugin.host.refusal import Refusal, refuse
from basic_plugin.host.resume import check_resume

CLASS_NAME = "PluginTrainingArguments"
#: --data_preflight's values (basic_plugin.host.preflight.resolve_mode says what auto becomes)
PREFLIGHT_MODES = ("auto", "full", "fast", "off")


class ParseRecord(dict):
    """The ModelArguments / DataArguments instances of the parse in progress (keys ``model``, ``data``),
    shared by the argument classes of one host installation; the TrainingArguments take them out."""


@dataclasses.dataclass
class HostArguments:
    """Flags of the plugin host itself."""

    plugin_max_nonfinite_steps: int = dataclasses.field(default=20, metadata={
        "help": "Stop (saving a checkpoint) after this many consecutive steps whose language-model loss was "
                "NaN/inf (e.g. no supervised token left after truncation), or whose plugin loss terms were NaN/inf "
                "or whose image rows did not check out (such steps train on the LM loss alone)."})
    seed_model_init: bool = dataclasses.field(default=False, metadata={
        "help": "Seed with --seed before the model is built, so the new projector starts the same in every run "
                "(LLaVA builds it before the Trainer seeds anything: baseline and BASIC runs start apart)."})
    data_preflight: str = dataclasses.field(default="auto", metadata={
        "help": "Check every record of --data_path before the model loads: fast (keys, turns, <image> tags, "
                "image inside --image_folder and present, LLaVA's preprocess on a sample), full (also decodes "
                "every image and preprocesses every record), off. auto: fast when a plugin is on, else off.",
        "choices": list(PREFLIGHT_MODES)})
    skip_bad_records: bool = dataclasses.field(default=False, metadata={
        "help": "When the pre-flight finds unusable records, train on the others (listed in "
                "<output_dir>/preflight/report.json) instead of stopping."})
    allow_changed_plugin_settings: bool = dataclasses.field(default=False, metadata={
        "help": "Resume a checkpoint of --output_dir even when its plugin settings (plugin_settings.json next to "
                "it) differ from this run's (refused otherwise, naming both)."})


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


def readable_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as a data file (a folder, missing, unreadable), or None."""
    if os.path.isdir(path):
        return "is a folder"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error.strerror or error})"
    return None


def writable_folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be (created and) written as an output folder, or None.

    Tried for real in the nearest folder that exists (a file created and removed at once), so a
    read-only mount or a missing permission is found for every user, root included; nothing is left.
    """
    import tempfile

    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".basic-llava-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return f"cannot be written ({type(error).__name__} in {existing}: {error.strerror or error})"
    return None


def path_checks(data_args, training_args) -> None:
    """The data file is readable and the output folder writable (LLaVA finds out after loading the model,
    or at its first save); checked after the flags, before anything is written."""
    data_path = getattr(data_args, "data_path", None) if data_args is not None else None
    if data_path:
        problem = readable_file_problem(str(data_path))
        if problem:
            raise Refusal(f"--data_path {data_path} {problem}; allowed: a readable JSON file of LLaVA records")
    if training_args.output_dir:
        problem = writable_folder_problem(str(training_args.output_dir))
        if problem:
            raise Refusal(f"--output_dir {training_args.output_dir}: {problem}; allowed: a folder this user can "
                          "create and write")


def host_checks(model_args, data_args, training_args) -> None:
    """What LLaVA itself would only refuse late (or never) is refused here."""
    if model_args is not None and getattr(model_args, "tune_mm_mlp_adapter", False) \
            and getattr(model_args, "mm_use_im_start_end", False):
        raise ValueError("--tune_mm_mlp_adapter True with --mm_use_im_start_end True is not supported by LLaVA "
                         "(it fails at the first step); allowed: --mm_use_im_start_end False for pretraining")
    if training_args.data_preflight not in PREFLIGHT_MODES:
        raise Refusal(f"--data_preflight {training_args.data_preflight!r} is invalid; "
                      f"allowed: {'|'.join(PREFLIGHT_MODES)}")
    check_llava_pitfalls(model_args, training_args)
    if training_args.plugin_max_nonfinite_steps < 1:
        raise ValueError(f"--plugin_max_nonfinite_steps {training_args.plugin_max_nonfinite_steps} is invalid; "
                         "allowed: an integer >= 1")
    if model_args is not None and getattr(model_args, "tune_mm_mlp_adapter", False) and training_args.output_dir \
            and list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        raise ValueError(
            f"--output_dir {training_args.output_dir} holds checkpoint-* folders: LLaVA would try to resume, but "
            "projector pretraining checkpoints hold only mm_projector.bin (vanilla LLaVA behaviour) and cannot be "
            "resumed; use a fresh --output_dir or start from that mm_projector.bin")


def switch_of(cls: type) -> str | None:
    """The flag that turns a plugin on (class attribute ``switch``, e.g. ``"basic"``), if it declares one."""
    switch = getattr(cls, "switch", None)
    return switch if isinstance(switch, str) and switch in {f.name for f in dataclasses.fields(cls)} else None


def active_plugin_classes(training_args, plugin_classes: list[type]) -> list[type]:
    """The plugin argument classes in use: switch on, or (no switch declared) some flag off its default."""
    def in_use(cls):
        switch = switch_of(cls)
        if switch is not None:
            return bool(getattr(training_args, switch))
        return any(f.default is not dataclasses.MISSING and getattr(training_args, f.name) != f.default
                   for f in dataclasses.fields(cls))

    return [cls for cls in plugin_classes if in_use(cls)]


def check_plugin_values(training_args, plugin_classes: list[type]) -> None:
    """Refuse what can only waste a run: non-finite numbers, and a plugin's flags while it is off."""
    for cls in plugin_classes:
        for f in dataclasses.fields(cls):
            value = getattr(training_args, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise Refusal(f"--{f.name} {value} is invalid; allowed: a finite number")
        switch = switch_of(cls)
        if switch is None or getattr(training_args, switch):
            continue
        given = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(cls) if f.name != switch
                 and f.default is not dataclasses.MISSING and getattr(training_args, f.name) != f.default}
        if given:
            raise set_while_off(switch, given)


def set_while_off(switch: str, given: dict) -> Refusal:
    """The refusal of a plugin's flags ``given`` (name -> value) while its ``switch`` is off."""
    flags = ", ".join(f"--{name} {value}" for name, value in given.items())
    return Refusal(f"{flags}: set while --{switch} is off, so the run would ignore "
                   f"{'it' if len(given) == 1 else 'them'}; allowed: add --{switch} True, or drop "
                   f"{'the flag' if len(given) == 1 else 'these flags'}")


def unknown_flags_message(flags) -> str:
    """LLaVA's parser only says flags were unused; say which plugin would have taken them."""
    from basic_plugin.host.plugins import (ALLOW_ENV, BLOCK_ENV, available_entry_points, blocked_names,
                                           failed_plugins)

    blocked = sorted(blocked_names() & set(available_entry_points()))
    failed = failed_plugins()
    hint = (f" Blocked plugins (by {BLOCK_ENV} / {ALLOW_ENV}): {', '.join(blocked)}; their flags are unknown "
            "while they are blocked." if blocked else "")
    if failed:
        hint += f" Plugins that failed to load (see the warning above): {', '.join(failed)}."
    if not hint:
        hint = " No installed plugin defines them (see `basic-llava doctor`)."
    return f"unknown training flags: {flags}.{hint}"


def given_flags(argv: list, classes) -> dict:
    """The flags ``argv`` gives (field name -> parsed value), read by the parser LLaVA's ``train()`` builds
    from ``classes`` (abbreviations, ``--flag=value`` and ``--no_flag`` included), and nothing else.

    What that parser would refuse is a :class:`Refusal` here, one line: an invalid choice or value, a
    missing required flag (argparse would print its whole usage), and an unknown flag (LLaVA's parser
    says so only after every argument class, the data pre-flight included, has run).
    """
    import argparse

    import transformers

    class Parser(transformers.HfArgumentParser):
        def error(self, message):
            raise Refusal(message)

    parser = Parser(classes)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise Refusal(unknown_flags_message(unknown))
    return vars(namespace)


def check_command_line(argv: list, classes, plugin_classes: list[type] | None = None) -> dict:
    """Refuse a command line before anything runs: what :func:`given_flags` refuses, and a plugin's
    flags given while its switch is off, whatever their value (the default too). Returns the given flags."""
    given = given_flags(argv, classes)
    if plugin_classes is None:
        load_plugins()
        plugin_classes = plugin_argument_classes()
    for cls in plugin_classes:
        switch = switch_of(cls)
        if switch is None or given.get(switch, getattr(cls, switch, False)):
            continue
        named = {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name != switch and f.name in given}
        if named:
            raise set_while_off(switch, named)
    return given


def picklable_base(base: type) -> type:
    """The nearest class of ``base``'s MRO that pickle can find by name.

    While the host is applied, ``llava.train.train.TrainingArguments`` names the host's
    class, so LLaVA's own cannot be pickled by reference; ``transformers.TrainingArguments``
    can, and the saved state keeps LLaVA's fields as attributes.
    """
    for cls in base.__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return cls
    return object


def build_training_arguments(base: type, plugin_classes: list[type] | None = None, *,
                             preflight: Callable | None = None, parsed: ParseRecord | None = None,
                             exit_on_refusal: bool = False) -> type:
    """Return ``base`` extended with the host's fields and those of ``plugin_classes``
    (default: the loaded plugins').

    ``preflight(model_args, data_args, training_args, plugin_active=...)`` runs once the
    flags are valid (None: no data pre-flight, e.g. a class rebuilt to unpickle a run).
    ``parsed``: where the :func:`recording` classes of the same installation put their
    instances (None: nothing recorded, the hooks get None for both). ``exit_on_refusal``: a
    refusal ends the process at once instead of being raised.
    """
    parsed = ParseRecord() if parsed is None else parsed
    if plugin_classes is None:
        load_plugins()
        plugin_classes = plugin_argument_classes()
    taken = {f.name: base.__name__ for f in dataclasses.fields(base)}
    new_fields = []
    for cls in [HostArguments, *plugin_classes]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in taken:
                raise ValueError(f"plugin flag --{f.name} of {cls.__name__} clashes with {taken[f.name]}")
            taken[f.name] = cls.__name__
            new_fields.append((f.name, hints[f.name], _copy_field(f)))

    def __post_init__(self):
        base.__post_init__(self)
        model_args, data_args = parsed.pop("model", None), parsed.pop("data", None)
        try:
            host_checks(model_args, data_args, self)
            check_plugin_values(self, plugin_classes)
            pm.hook.llava_validate_arguments(model_args=model_args, data_args=data_args, training_args=self)
            if preflight is not None:  # a run, not a class rebuilt to unpickle one
                path_checks(data_args, self)
                check_resume(self, plugin_classes, active=bool(active_plugin_classes(self, plugin_classes)))
        except ValueError as error:  # a plugin's or the host's own refusal: a message, not a traceback
            refuse(error, exit_now=exit_on_refusal)
        if preflight is not None:
            try:
                preflight(model_args, data_args, self, plugin_active=bool(active_plugin_classes(self, plugin_classes)))
            except Refusal as error:
                refuse(error, exit_now=exit_on_refusal)
        if self.seed_model_init:
            import transformers

            transformers.set_seed(self.seed)

    added = {name for name, _, _ in new_fields}

    def __reduce_ex__(self, protocol):
        """Pickled (``training_args.bin``) as LLaVA's own class when no plugin is on, so it loads without
        basic-llava; with a plugin on, as this class (the plugin's flags are part of the run)."""
        if active_plugin_classes(self, plugin_classes):
            return object.__reduce_ex__(self, protocol)
        import copyreg

        state = {k: v for k, v in self.__dict__.items() if k not in added}
        return copyreg._reconstructor, (picklable_base(base), object, None), state  # stdlib only: loads without us

    cls = dataclasses.make_dataclass(
        CLASS_NAME, new_fields, bases=(base,),
        namespace={"__post_init__": __post_init__, "__reduce_ex__": __reduce_ex__}
    )
    cls.__module__ = __name__
    cls.__qualname__ = CLASS_NAME
    setattr(sys.modules[__name__], CLASS_NAME, cls)  # so pickling training_args.bin finds it
    return cls


def recording(base: type, key: str, parsed: ParseRecord) -> type:
    """``base`` (ModelArguments or DataArguments) recording each instance in ``parsed[key]`` for the
    validation hooks."""
    original_post_init = getattr(base, "__post_init__", None)

    def __post_init__(self):
        if original_post_init is not None:
            original_post_init(self)
        parsed[key] = self

    cls = dataclasses.make_dataclass(base.__name__, [], bases=(base,), namespace={"__post_init__": __post_init__})
    cls.__module__ = base.__module__
    return cls


def __getattr__(name):
    """Rebuild the class on demand, e.g. when a saved ``training_args.bin`` is unpickled."""
    if name == CLASS_NAME:
        from llava.train.train import TrainingArguments

        base = getattr(TrainingArguments, "_llava_plugin_base", TrainingArguments)
        return build_training_arguments(base)
    raise AttributeError(name)

"""The plugin host behind LLaVA's own plugin support (``patches/0001-plugin-hooks.patch``).

A LLaVA with that patch loads the ``llava`` entry points itself (``llava/plugins.py``) and,
first thing in ``train()``, asks the hook ``llava_train_classes`` which classes to train
with. This module, registered as the ``llava`` entry point ``basic-llava``, answers with
the classes :func:`basic_plugin.host.integration.apply_plugin_host` installs at runtime:

- ``ModelArguments``, ``DataArguments``, ``TrainingArguments``: the last plus every field
  of every plugin's argument dataclass (``--basic True`` and friends), all three validated
  by the plugins while parsing;
- ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``: the plugin forward (the run's
  objectives, with hidden states and image positions, inside ``forward``);
- ``LLaVATrainer``: asks the plugins for their objectives (``llava_objective``) and logs
  their named loss terms.

So ``deepspeed llava/train/train_mem.py ... --basic True`` of a patched LLaVA trains
exactly as ``deepspeed --module basic_plugin.train_mem ... --basic True`` does with an
unpatched one. The vision-tower seam needs nothing here: the patched LLaVA asks
``llava_build_vision_tower`` of the plugins itself (at inference too).

Off means off: a command line with no host or plugin flag gets ``{}`` (LLaVA's own classes,
LLaVA's own checks: no version policy, no CPU workaround), unless ``BASIC_LLAVA_HOST=1``
asks for the host (:func:`native_train_classes`).

Both hooks are specified once, in :mod:`basic_plugin.host.hookspecs`; the patch's
``llava/plugins.py`` carries the same specs (``patches/build_patch.py`` writes them in).
The host's own plugin manager registers this module itself, on every load and whatever
``LLAVA_PLUGINS`` says (:data:`basic_plugin.host.plugins.BUILTIN_PLUGINS`), and knows the
hook, so this implementation passes its validation like any other plugin's. A patched
LLaVA's manager loads it as the entry point ``basic-llava`` and applies ``LLAVA_PLUGINS`` /
``LLAVA_PLUGINS_BLOCK`` to it (``basic-llava doctor`` reports it when they keep it out).

When the runtime integration is already in place (``python -m basic_plugin.train`` on a
patched LLaVA), the classes LLaVA passes are already the host's: nothing is replaced twice.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Dict, Sequence

from basic_plugin.host.hookspecs import hookimpl
from basic_plugin.host.integration import HOSTED_CLASSES, host_classes  # noqa: F401  (one definition)
from basic_plugin.host.refusal import refusals_exit


#: opt-in: on a patched LLaVA, run the host (its version policy, CPU workarounds and classes) even when no
#: plugin flag is given
HOST_ENV = "BASIC_LLAVA_HOST"
_TRUE = ("yes", "true", "t", "y", "1")  # transformers' string_to_bool


@dataclass(frozen=True)
class FlagRequest:
    """What a command line asks of the host, read before LLaVA parses it."""

    given: tuple[str, ...]  #: host and plugin flags named on the command line
    plugin_on: bool  #: a plugin's switch is on (or a plugin without a switch has a flag given)


def flag_request(argv: Sequence[str]) -> FlagRequest:
    """The host's and the loaded plugins' flags in ``argv`` (``--name value``, ``--name=value``, bare ``--name``
    for a bool, ``--no_name``), by exact name as LLaVA's parser will read them."""
    from basic_plugin.host.arguments import HostArguments, plugin_argument_classes, switch_of
    from basic_plugin.host.plugins import load_plugins

    load_plugins()
    plugin_classes = plugin_argument_classes()
    names: dict[str, str] = {}
    for cls in (HostArguments, *plugin_classes):
        for f in dataclasses.fields(cls):
            names[f.name] = f.name
            names[f"no_{f.name}"] = f.name  # HfArgumentParser's negation of a bool defaulting to True
    values: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if name not in names:
            continue
        if not eq:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = None if following is None or following.startswith("--") else following
        values[names[name]] = "false" if name != names[name] else value

    def on(cls) -> bool:
        switch = switch_of(cls)
        if switch is None:
            return any(f.name in values for f in dataclasses.fields(cls))
        return switch in values and (values[switch] is None or values[switch].lower() in _TRUE)

    return FlagRequest(given=tuple(values), plugin_on=any(on(cls) for cls in plugin_classes))


def host_opted_in() -> bool:
    """``BASIC_LLAVA_HOST=1``: the host runs on a patched LLaVA's own ``train()`` without a plugin flag."""
    return os.environ.get(HOST_ENV, "").strip().lower() in _TRUE


def native_train_classes(classes: Dict[str, type], argv: Sequence[str] | None = None) -> Dict[str, type]:
    """Answer of the patched LLaVA's ``llava_train_classes``: {} keeps LLaVA's classes.

    Off means off: with no host or plugin flag on the command line (``argv``, default
    ``sys.argv[1:]``), ``train()`` keeps LLaVA's classes and LLaVA's checks, nothing else
    (no version policy, no CPU workaround, ``training_args.bin`` pickled as LLaVA's own
    class), unless ``BASIC_LLAVA_HOST=1`` asks for the host. With a flag given, the host's
    classes parse it; with a plugin switched on (``--basic True``) or the opt-in, this also
    runs what ``python -m basic_plugin.train`` runs before ``train()``: the version check,
    the CPU workarounds (no-ops with CUDA) and the checkpoint-RNG allow-list. No entry point
    of ours runs around LLaVA's own ``train()`` here, so the argument classes end the process
    themselves on a refusal (one ``error:`` line, status 2). Not repeated here: that entry's
    friendlier message for unknown flags, and its process-group teardown after ``train()``
    (a CPU/gloo exit issue; the patched ``train()`` has no hook after it returns).
    {} as well when the classes are already the host's (the runtime integration in place).
    """
    from basic_plugin.host.compat import allow_checkpoint_rng_states
    from basic_plugin.host.cpu import apply_cpu_workarounds
    from basic_plugin.host.versions import require_supported_versions

    if hasattr(classes["TrainingArguments"], "_llava_plugin_base"):  # runtime integration in place
        return {}
    request = flag_request(sys.argv[1:] if argv is None else argv)
    opted_in = host_opted_in()
    if not request.given and not opted_in:
        return {}
    if request.plugin_on or opted_in:
        with refusals_exit():  # LLaVA's own entry would print a traceback: a refusal ends the process here
            require_supported_versions()
        apply_cpu_workarounds()
        allow_checkpoint_rng_states()
    install_data_module()
    return host_classes(classes, exit_on_refusal=True)


def install_data_module() -> None:
    """The runtime seam the patch's class hook cannot carry (a function, not a class): ``train()`` looks
    ``make_supervised_data_module`` up in its module when it runs, so the host's (a record whose image
    fails to load named or skipped, :mod:`basic_plugin.host.dataset`) is put there once, with the host."""
    import llava.train.train as llava_train

    from basic_plugin.host.dataset import hosted_data_module

    if not hasattr(llava_train.make_supervised_data_module, "_llava_plugin_original"):
        llava_train.make_supervised_data_module = hosted_data_module(llava_train.make_supervised_data_module)


@hookimpl
def llava_train_classes(classes):
    """Hook of the patched LLaVA (``llava/plugins.py``): replace its training classes."""
    return native_train_classes(classes)

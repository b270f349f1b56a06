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

from typing import Dict

from basic_plugin.host.hookspecs import hookimpl
from basic_plugin.host.integration import HOSTED_CLASSES, host_classes  # noqa: F401  (one definition)
from basic_plugin.host.refusal import refusals_exit


def native_train_classes(classes: Dict[str, type]) -> Dict[str, type]:
    """Answer of the patched LLaVA's ``llava_train_classes``: {} when the classes are already the host's.

    Runs what ``python -m basic_plugin.train`` runs before ``train()``: the version check,
    the CPU workarounds (no-ops with CUDA), the checkpoint-RNG allow-list and plugin loading
    (``LLAVA_PLUGINS*`` honoured). No entry point of ours runs around LLaVA's own ``train()``
    here, so the argument classes end the process themselves on a refusal (one ``error:``
    line, status 2). Not repeated here: that entry's friendlier message for unknown flags,
    and its process-group teardown after ``train()`` (a CPU/gloo exit issue; the patched
    ``train()`` has no hook after it returns).
    """
    from basic_plugin.host.compat import allow_checkpoint_rng_states
    from basic_plugin.host.cpu import apply_cpu_workarounds
    from basic_plugin.host.plugins import load_plugins
    from basic_plugin.host.versions import require_supported_versions

    if hasattr(classes["TrainingArguments"], "_llava_plugin_base"):  # runtime integration in place
        return {}
    with refusals_exit():  # LLaVA's own entry would print a traceback: a refusal ends the process here
        require_supported_versions()
    apply_cpu_workarounds()
    allow_checkpoint_rng_states()
    load_plugins()
    return host_classes(classes, exit_on_refusal=True)


@hookimpl
def llava_train_classes(classes):
    """Hook of the patched LLaVA (``llava/plugins.py``): replace its training classes."""
    return native_train_classes(classes)

"""The one module a basic-llava plugin imports.

A plugin is a module (or object) with hook implementations, found through an entry point
in the ``llava`` group; docs/PLUGIN_HOOKS.md has a section per hook, the objective
contract and the example plugin (``examples/projector_norm_plugin.py``)::

    from basic_plugin.api import Objective, hookimpl

- :data:`hookimpl`: marks a hook implementation (pluggy project ``llava``);
- :class:`Objective`: what ``llava_objective`` returns for a run: ``wants_hidden_states``,
  ``terms(model, batch, outputs, image_positions)`` and ``review(logged)``;
- :class:`Verdict`: what ``review`` returns to warn (or stop the run) at a logging step;
- :class:`ForwardBatch`, :class:`ImagePositions`: what ``terms`` is handed about the batch
  and where its image tokens sit in the LLM's input;
- :class:`Refusal`: raise it (or ``ValueError`` from ``llava_validate_arguments``) to refuse
  a run with one line naming the setting and what is allowed.

Everything else under ``basic_plugin.host`` is the host's own and may change.
"""
from basic_plugin.host.contract import ForwardBatch, Objective, Verdict
from basic_plugin.host.hookspecs import hookimpl
from basic_plugin.host.positions import ImagePositions
from basic_plugin.host.refusal import Refusal

__all__ = ["ForwardBatch", "ImagePositions", "Objective", "Refusal", "Verdict", "hookimpl"]

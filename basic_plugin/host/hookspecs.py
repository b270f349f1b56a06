"""The hooks a LLaVA training plugin can implement (pluggy project ``llava``).

Few hooks, each a typed function: a plugin implements the ones it needs with
``@basic_plugin.hookimpl`` and is found through the ``llava`` entry-point group.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pluggy

PROJECT = "llava"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llava_plugin_arguments() -> Sequence[type]:
    """Return dataclasses whose fields become flags of LLaVA's ``train()``.

    Every field needs a default and a name no other plugin or LLaVA uses; the
    values arrive as attributes of ``training_args``.
    """


@hookspec
def llava_validate_arguments(model_args: Any, data_args: Any, training_args: Any) -> None:
    """Raise ``ValueError`` naming the flag when the plugin's settings are invalid.

    Called while ``train()`` parses its arguments, before any model is loaded
    and before anything is written to ``output_dir``. ``model_args`` and
    ``data_args`` are None when the training arguments are parsed on their own.
    """


@hookspec(firstresult=True)
def llava_build_vision_tower(vision_tower_cfg: Any, kwargs: Mapping[str, Any]) -> Optional[Any]:
    """Build the vision tower named by ``vision_tower_cfg``, or return None.

    The first plugin to return a module wins; LLaVA's CLIP tower is the default.
    The module must offer what LLaVA's ``CLIPVisionTower`` offers (``forward``,
    ``image_processor``, ``hidden_size``, ``num_patches``, ``config``,
    ``load_model``, ``is_loaded``, ``dtype``, ``device``).
    """


@hookspec
def llava_model_ready(model: Any, tokenizer: Any, training_args: Any, data_args: Any) -> None:
    """The model is built, vision modules and tokenizer are set up; the trainer is next.

    Check support and remember settings here; raise to refuse the run.
    """


@hookspec
def llava_wants_hidden_states(model: Any) -> bool:
    """Return True when ``llava_auxiliary_losses`` needs ``outputs.hidden_states``."""


@hookspec
def llava_auxiliary_losses(model: Any, batch: Any, outputs: Any, image_positions: Any) -> Optional[Mapping[str, Any]]:
    """Return named scalar loss tensors for this training batch, or None.

    Called inside the model's forward (so under ZeRO-3 the parameters a plugin
    uses through their modules are gathered, and gradients reduce normally),
    after the language model ran once. ``batch`` is a
    :class:`basic_plugin.host.forward.ForwardBatch`, ``outputs`` the model outputs
    (with ``hidden_states`` when any plugin asked), ``image_positions`` a
    :class:`basic_plugin.host.positions.ImagePositions`. Each term is added to the
    loss and logged under its name. Every rank must build the same graph: on a
    batch without images return zero-valued terms, never skip module calls.
    """


@hookspec
def llava_log_metrics(model: Any) -> Optional[Mapping[str, float]]:
    """Return extra values to log at this logging step (already averaged)."""

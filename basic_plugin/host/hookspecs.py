"""The hooks a LLaVA training plugin can implement (pluggy project ``llava``).

Few hooks, each a typed function: a plugin implements the ones it needs with
``@hookimpl`` from :mod:`basic_plugin.api` and is found through the ``llava`` entry-point
group; docs/PLUGIN_HOOKS.md has a section per hook.

``llava_train_classes`` and ``llava_build_vision_tower`` are copied verbatim into the
patched LLaVA's ``llava/plugins.py`` (``patches/build_patch.py``), which imports nothing of
basic-llava: their annotations stay plain ``typing`` ones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import pluggy

from basic_plugin.host.contract import Objective

if TYPE_CHECKING:  # only for the annotations: LLaVA and transformers load when a run needs them
    from llava.model.llava_arch import LlavaMetaForCausalLM
    from llava.train.train import DataArguments, ModelArguments, TrainingArguments
    from transformers import PreTrainedTokenizerBase

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
def llava_validate_arguments(model_args: Optional[ModelArguments], data_args: Optional[DataArguments],
                             training_args: TrainingArguments) -> None:
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
def llava_objective(model: LlavaMetaForCausalLM, tokenizer: PreTrainedTokenizerBase, training_args: TrainingArguments,
                    data_args: Optional[DataArguments]) -> Optional[Objective]:
    """Return this plugin's objective for the run (a :class:`basic_plugin.api.Objective`), or None.

    Called once, when the model is built and its vision modules and tokenizer are set up,
    before the trainer. ``model`` is the LLaVA model itself (never a PEFT or DeepSpeed
    wrapper). Return None when the plugin is off for this run: with no objective at all,
    training is LLaVA's own code path. The objective holds the plugin's settings and
    state; raise to refuse the run (unsupported model, bad depth).
    """


@hookspec(firstresult=True)
def llava_train_classes(classes: Mapping[str, type]) -> Optional[Mapping[str, type]]:
    """Asked first thing in ``train()``: which of its classes to train with.

    ``classes`` maps the names of the classes ``train()`` uses (argument classes, model
    classes, ``LLaVATrainer``) to LLaVA's own; return ``{name: subclass}`` for those to
    replace (each must subclass the one it replaces), or None to keep them all.
    """

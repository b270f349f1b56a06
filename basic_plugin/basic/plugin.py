"""BASIC's hook implementations (registered through the ``llava`` entry point ``basic``): its flags,
their validation, and its objective for a run (:class:`basic_plugin.basic.objective.BasicObjective`)."""
from __future__ import annotations

import os
import sys
from dataclasses import fields

from basic_plugin.api import hookimpl
from basic_plugin.basic.arguments import BasicArguments, validate_basic_arguments
from basic_plugin.basic.channels import describe, find_massive_channels
from basic_plugin.basic.guard import Guard
from basic_plugin.basic.objective import BasicObjective, BasicSettings
from basic_plugin.basic.target import default_depth, depth_range, valid_depth

__all__ = ["BasicObjective", "BasicSettings", "settings_for", "llava_plugin_arguments", "llava_validate_arguments",
           "llava_objective"]

SUPPORTED_MODEL_TYPES = ("llava_llama", "llava_mistral")


@hookimpl
def llava_plugin_arguments():
    return [BasicArguments]


#: the flags that say whether BASIC is on, and in which stage (the others only shape what it does)
SWITCHES = ("basic", "basic_pretrain", "basic_finetune")


def off_in_this_stage(model_args, training_args) -> str | None:
    """With ``--basic True``: the line saying BASIC is off in this run's stage while some of its other
    flags were changed from their defaults (they would do nothing), or None."""
    pretraining = bool(getattr(model_args, "tune_mm_mlp_adapter", False))
    stage_flag = "basic_pretrain" if pretraining else "basic_finetune"
    if getattr(training_args, stage_flag):
        return None
    changed = [f"--{f.name} {getattr(training_args, f.name)}" for f in fields(BasicArguments)
               if f.name not in SWITCHES and getattr(training_args, f.name) != f.default]
    if not changed:
        return None
    stage = "projector pretraining (--tune_mm_mlp_adapter True)" if pretraining else "instruction tuning"
    return (f"[basic] --{stage_flag} False: BASIC is off in {stage}, so {', '.join(changed)} "
            f"{'has' if len(changed) == 1 else 'have'} no effect in this run")


@hookimpl
def llava_validate_arguments(model_args, data_args, training_args):
    validate_basic_arguments(training_args)
    if not training_args.basic:
        return
    note = off_in_this_stage(model_args, training_args) if model_args is not None else None
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr, flush=True)
    merge = getattr(model_args, "mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ValueError(f"--basic supports --mm_patch_merge_type flat (LLaVA-1.5); got {merge!r} "
                         "(anyres/spatial merging is LLaVA-NeXT)")
    aspect = getattr(data_args, "image_aspect_ratio", "square")
    if aspect not in ("square", "pad"):
        raise ValueError(f"--basic supports --image_aspect_ratio square|pad (LLaVA-1.5); got {aspect!r}")
    config = checkpoint_config(getattr(model_args, "model_name_or_path", None))
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_CHECKPOINT_TYPES:
        raise ValueError(f"--basic supports Llama and Mistral LLMs ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"--model_name_or_path is a {model_type!r} checkpoint")
    layers = config.get("num_hidden_layers")
    if layers and training_args.basic_depth is not None and not valid_depth(training_args.basic_depth, layers):
        raise ValueError(f"--basic_depth {training_args.basic_depth} is out of range; allowed: {depth_range(layers)} "
                         "for this LLM")


SUPPORTED_CHECKPOINT_TYPES = ("llama", "mistral", "llava_llama", "llava_mistral", "llava")


def checkpoint_config(path) -> dict:
    """A local checkpoint's config.json (empty when it is not a local folder), loading nothing else."""
    import json
    import os

    config = os.path.join(str(path), "config.json") if path else None
    if not config or not os.path.isfile(config):
        return {}
    with open(config, encoding="utf-8") as f:
        return json.load(f)


def supported_model(model) -> bool:
    """LLaVA on a Llama or Mistral LLM (a Vicuna checkpoint says model_type 'llama' until LLaVA saves it)."""
    from llava.model.llava_arch import LlavaMetaForCausalLM
    from transformers import LlamaForCausalLM, MistralForCausalLM

    return isinstance(model, LlavaMetaForCausalLM) and isinstance(model, (LlamaForCausalLM, MistralForCausalLM))


def settings_for(model, training_args, tokenizer=None) -> BasicSettings | None:
    """BASIC's settings for this run, or None when BASIC is off for this stage.

    With ``--basic_drop_channels`` other than 0 the channels are found here, from the LLM and
    ``tokenizer`` (:func:`basic_plugin.basic.channels.find_massive_channels`), and logged once.
    """
    if not training_args.basic:
        return None
    pretraining = bool(getattr(training_args, "tune_mm_mlp_adapter", False))
    if (pretraining and not training_args.basic_pretrain) or (not pretraining and not training_args.basic_finetune):
        return None
    if not supported_model(model):
        raise ValueError(f"--basic supports {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is "
                         f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})")
    layers = model.config.num_hidden_layers
    depth = training_args.basic_depth or default_depth(layers)
    if not valid_depth(depth, layers):
        raise ValueError(f"--basic_depth {depth} is out of range; allowed: {depth_range(layers)} for this LLM")
    spec = str(training_args.basic_drop_channels).strip()
    channels: tuple = ()
    if spec not in ("0", ""):
        if tokenizer is None:
            raise ValueError(f"--basic_drop_channels {spec} needs the run's tokenizer to run its text probe")
        found = find_massive_channels(model, tokenizer, depth, spec)
        channels = tuple(found["channels"])
        if getattr(training_args, "process_index", 0) == 0:
            print(f"[basic] {describe(found, spec)}", flush=True)
    return BasicSettings.from_flags(training_args, depth=depth, drop_channels=channels)


@hookimpl
def llava_objective(model, tokenizer, training_args, data_args):
    settings = settings_for(model, training_args, tokenizer)
    if settings is None:
        return None
    return BasicObjective(settings, Guard.from_flags(training_args))

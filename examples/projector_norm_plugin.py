"""An example LLaVA training plugin: penalise the projector output's squared norm.

Install it as a ``llava`` entry point (``[project.entry-points.llava]``,
``projector-norm = "projector_norm_plugin"``), then train with
``--projector_norm_weight 0.01``. It works unchanged under LoRA and DeepSpeed: the host
hands its objective the LLaVA model itself, and keeps its state in the objective.
"""
from dataclasses import dataclass
from typing import ClassVar

from basic_plugin.api import Objective, hookimpl


@dataclass
class ProjectorNormArguments:
    switch: ClassVar[str] = "projector_norm"  # its other flags are refused while this is off

    projector_norm: bool = False
    projector_norm_weight: float = 0.01


class ProjectorNorm(Objective):
    """The plugin's objective for one run: its weight, and its term for each batch (no review)."""

    wants_hidden_states = False

    def __init__(self, weight: float):
        self.weight = weight

    def terms(self, model, batch, outputs, image_positions):
        features = batch.image_features.float()  # projector output, (images, tokens, d)
        norm = features.pow(2).sum(-1).mean()
        return {"projector_norm": self.weight * norm}, {"projector_norm_raw": norm.detach()}


@hookimpl
def llava_plugin_arguments():
    return [ProjectorNormArguments]


@hookimpl
def llava_validate_arguments(model_args, data_args, training_args):
    if training_args.projector_norm_weight < 0:
        raise ValueError(f"--projector_norm_weight {training_args.projector_norm_weight} is invalid; "
                         "allowed: a number >= 0")


@hookimpl
def llava_objective(model, tokenizer, training_args, data_args):
    return ProjectorNorm(training_args.projector_norm_weight) if training_args.projector_norm else None

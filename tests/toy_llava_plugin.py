"""A third-party-style plugin used by the end-to-end tests, installed through a real entry point.

It penalises the squared projector output at the image rows the host reports, so
that the test can check the term is computed inside the forward, added to the
loss and logged, and counts its own calls (state in its objective, not on the model).
"""
from dataclasses import dataclass

import torch

from basic_plugin.api import Objective, hookimpl


@dataclass
class ToyArguments:
    toy_weight: float = 0.0


class ToyObjective(Objective):
    wants_hidden_states = True

    def __init__(self, weight: float):
        self.weight = weight
        self.calls = 0

    def terms(self, model, batch, outputs, image_positions):
        self.calls += 1
        rows = outputs.hidden_states[0][image_positions.batch_index, image_positions.seq_index].float()
        value = rows.pow(2).mean() if rows.numel() else rows.sum()
        return {"toy": self.weight * value}, {"toy_calls": torch.tensor(float(self.calls))}


@hookimpl
def llava_plugin_arguments():
    return [ToyArguments]


@hookimpl
def llava_validate_arguments(model_args, data_args, training_args):
    if training_args.toy_weight < 0:
        raise ValueError(f"--toy_weight {training_args.toy_weight} is invalid; allowed: a number >= 0")


@hookimpl
def llava_objective(model, tokenizer, training_args, data_args):
    return ToyObjective(training_args.toy_weight) if training_args.toy_weight else None

"""A third-party-style plugin used by the end-to-end tests, installed through a real entry point.

It penalises the squared projector output at the image rows the host reports, so
that the test can check the term is computed inside the forward, added to the
loss and logged.
"""
from dataclasses import dataclass

from basic_plugin import hookimpl


@dataclass
class ToyArguments:
    toy_weight: float = 0.0


@hookimpl
def llava_plugin_arguments():
    return [ToyArguments]


@hookimpl
def llava_validate_arguments(model_args, data_args, training_args):
    if training_args.toy_weight < 0:
        raise ValueError(f"--toy_weight {training_args.toy_weight} is invalid; allowed: a number >= 0")


@hookimpl
def llava_model_ready(model, tokenizer, training_args, data_args):
    from basic_plugin.host.trainer import find_plugin_model

    host = find_plugin_model(model)
    host.toy_weight = training_args.toy_weight
    host.toy_calls = 0


@hookimpl
def llava_wants_hidden_states(model):
    return bool(getattr(model, "toy_weight", 0.0))


@hookimpl
def llava_auxiliary_losses(model, batch, outputs, image_positions):
    if not getattr(model, "toy_weight", 0.0):
        return None
    model.toy_calls += 1
    rows = outputs.hidden_states[0][image_positions.batch_index, image_positions.seq_index].float()
    value = rows.pow(2).mean() if rows.numel() else rows.sum()
    return {"toy": model.toy_weight * value}


@hookimpl
def llava_log_metrics(model):
    if model is None or not getattr(model, "toy_weight", 0.0):
        return None
    return {"toy_calls": float(model.toy_calls)}

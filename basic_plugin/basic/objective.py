"""BASIC's objective for a run: its settings, and its loss terms and metrics for each training batch,
from the single forward's hidden states."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from basic_plugin.api import Objective
from basic_plugin.basic.arguments import FLAG_PREFIX
from basic_plugin.basic.channels import keep_mask, standardize_rows
from basic_plugin.basic.guard import Guard
from basic_plugin.basic.health import health_metrics
from basic_plugin.basic.losses import basic_terms_fused, refined_target
from basic_plugin.basic.patch_weights import image_attention_mass
from basic_plugin.basic.target import target_layers


@dataclass
class BasicSettings:
    """BASIC's resolved settings for one model (depth known, stage decided).

    Each field is the flag ``--basic_<field>`` as given (defaults: :class:`BasicArguments`),
    except the two resolved for the model: ``depth`` (``--basic_depth`` or half the LLM's
    layers) and ``drop_channels`` (the channels ``--basic_drop_channels`` found).
    """

    depth: int
    lambda_das: float
    lambda_sds: float
    temperature: float
    vocab: str
    detach_vocab: bool
    patch_weights: str
    kl: str
    sds_chunk_size: int | None
    query_chunk: int
    drop_channels: tuple  # channels left out of both terms
    standardize_target: bool

    @classmethod
    def from_flags(cls, flags, *, depth: int, drop_channels: Sequence[int] = ()) -> "BasicSettings":
        """The settings from BASIC's flags (``training_args``), with ``depth`` and ``drop_channels`` resolved."""
        resolved = {"depth": depth, "drop_channels": tuple(drop_channels)}
        return cls(**{f.name: resolved[f.name] if f.name in resolved else getattr(flags, FLAG_PREFIX + f.name)
                      for f in fields(cls)})


def decoder_layers(model):
    """The LLM's decoder layers (LLaVA keeps them at ``model.get_model().layers``)."""
    return model.get_model().layers


def vocabulary_matrix(model, settings: BasicSettings) -> torch.Tensor:
    """E for L_sds, without ever reading a ZeRO-3 shard.

    Under ZeRO-3 the input embeddings are used through their module (a lookup of
    every id), so the gather happens in the module hook and the gradient flows
    back through the embedding as usual; ``lm_head`` is gathered and detached.
    """
    module = model.get_input_embeddings() if settings.vocab == "embed" else model.get_output_embeddings()
    weight = module.weight
    trainable = weight.requires_grad and not settings.detach_vocab
    if not hasattr(weight, "ds_id"):  # not partitioned
        return weight if trainable else weight.detach()
    if settings.vocab == "embed":
        ids = torch.arange(weight.ds_shape[0], device=weight.device)
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            matrix = module(ids)
        return matrix if trainable else matrix.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()


def per_sample_sums(values: torch.Tensor, rows: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``out[b] = sum of values[i] over the rows i of sample b`` (rows: (M,) sample index).

    Not ``index_add_``: an accumulate op with repeated indices adds in an unspecified order
    on some devices (atomics on CUDA), so its float result can change from run to run. Here
    each value is written once into its own cell of a (B, M) zero matrix, and the rows are
    summed by a plain reduction, whose order is fixed by the shape.
    """
    spread = values.new_zeros(num_samples, values.numel())
    return spread.scatter_(0, rows.reshape(1, -1), values.reshape(1, -1)).sum(dim=1)


def patch_weights(model, settings, hidden_states, batch, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i per image row as used, raw attention mass per row), both detached."""
    rows = positions.batch_index
    num_samples = positions.has_image.numel()
    count = torch.bincount(rows, minlength=num_samples).to(torch.float32)  # exact integers
    if settings.patch_weights == "uniform":
        weights = 1.0 / count[rows]
        return weights, weights
    raw = image_attention_mass(
        decoder_layers(model), hidden_states, batch.embeds_attention_mask, rows, positions.seq_index,
        positions.block_end, depth=settings.depth, position_ids=batch.position_ids,
        query_chunk=settings.query_chunk).to(rows.device)
    if settings.patch_weights == "raw":
        return raw, raw
    total = per_sample_sums(raw, rows, num_samples)
    return raw / total[rows].clamp_min(1e-12), raw


def basic_terms(model, settings: BasicSettings, batch, outputs, positions):
    """(loss terms added to the LM loss, detached metrics) for one batch.

    Batch value = mean over samples that contain an image; a batch without
    images still runs every module call and returns zeros tied to the graph.
    """
    hidden_states = outputs.hidden_states
    rows, seq = positions.batch_index, positions.seq_index
    student = hidden_states[0][rows, seq]
    target = refined_target([hidden_states[layer][rows, seq] for layer in target_layers(settings.depth)])
    weights, raw = patch_weights(model, settings, hidden_states, batch, positions)
    samples = positions.has_image.sum().clamp_min(1).to(torch.float32)
    per_batch = (weights / samples).detach()
    vocab = vocabulary_matrix(model, settings)
    s_used, t_used = compared_rows(student, target, settings)
    # lambda_das L_das and lambda_sds L_sds from one pass that writes both student gradients
    # into one buffer (values as direction_loss / distribution_loss; both enter the loss as a sum)
    das, sds = basic_terms_fused(s_used, t_used, vocab, per_batch, settings.lambda_das, settings.lambda_sds,
                                 temperature=settings.temperature, reverse=settings.kl == "reverse",
                                 chunk_size=settings.sds_chunk_size)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(s_used.float(), t_used.float(), dim=-1)
        metrics = {
            "basic_cos": cos.mean() if cos.numel() else cos.new_zeros(()),
            "basic_weight_mass": raw.sum() / samples,
            "basic_image_samples": samples if positions.num_rows else samples.new_zeros(()),
        }
    losses = {"basic_das": das, "basic_sds": sds}
    metrics.update(health_metrics(student, target, weights, positions.image_index, batch.image_features.shape[0],
                                  outputs.loss, losses["basic_das"], losses["basic_sds"], compared=(s_used, t_used)))
    return losses, metrics


def compared_rows(student: torch.Tensor, target: torch.Tensor, settings: BasicSettings):
    """``(v, vhat)`` as both terms compare them: the target standardised per channel
    (``--basic_standardize_target``), then the dropped channels zeroed in both
    (``--basic_drop_channels``; the student's gradient there is zero). The paper: unchanged."""
    if settings.standardize_target:
        target = standardize_rows(target)
    keep = keep_mask(settings.drop_channels, student.shape[-1], student.device, student.dtype)
    if keep is not None:
        student, target = student * keep, target * keep.to(target.dtype)
    return student, target


class BasicObjective(Objective):
    """BASIC for one run: its resolved settings; its terms and metrics for each batch; its guard's review."""

    wants_hidden_states = True

    def __init__(self, settings: BasicSettings, guard: Guard | None = None):
        self.settings = settings
        self.guard = guard or Guard(mode="off")

    def terms(self, model, batch, outputs, image_positions):
        return basic_terms(model, self.settings, batch, outputs, image_positions)

    def review(self, logged):
        return self.guard.review(logged)

"""What the host and a plugin agree on for a run: the objective a plugin returns, its verdict,
and the batch it is handed. Plugins import these from :mod:`basic_plugin.api`.

A plugin that is on for a run returns one :class:`Objective` from ``llava_objective``; it
holds the plugin's settings and state, computes the plugin's loss terms and metrics for a
batch (:meth:`Objective.terms`, inside the model's forward) and may judge each logging step
(:meth:`Objective.review`). docs/PLUGIN_HOOKS.md describes the contract for plugin authors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # only for the annotations: torch, transformers and LLaVA load when a run needs them
    import torch
    from llava.model.llava_arch import LlavaMetaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from basic_plugin.host.positions import ImagePositions


@dataclass(frozen=True)
class Verdict:
    """An objective's judgement at a logging step (from :meth:`Objective.review`)."""

    message: str  #: one line for the training log
    stop: bool = False  #: end the run (with a checkpoint) after this step


@dataclass
class ForwardBatch:
    """The batch as collated, and as LLaVA spliced it for the LLM."""

    input_ids: torch.Tensor  # collated ids with IMAGE_TOKEN_INDEX placeholders
    attention_mask: Optional[torch.Tensor]  # collated mask
    images: Any
    embeds_attention_mask: torch.Tensor  # (B, L) bool mask of the spliced LLM input
    position_ids: Optional[torch.Tensor]  # as passed to the LLM (None: arange)
    labels: Optional[torch.Tensor]  # spliced labels
    image_features: torch.Tensor  # projector output, (num_images, N, d)


@runtime_checkable
class Objective(Protocol):
    """A plugin's part of the training loss for one run.

    Subclass it (the defaults below then apply), or give any object the three members;
    the host refuses an objective that lacks one.
    """

    #: True when :meth:`terms` reads ``outputs.hidden_states``
    wants_hidden_states: bool = False

    def terms(self, model: LlavaMetaForCausalLM, batch: ForwardBatch, outputs: CausalLMOutputWithPast,
              image_positions: ImagePositions) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]:
        """``(losses, metrics)`` for this batch: named scalar tensors, left on the device.

        Called inside the model's forward (ZeRO-3 gathers what the plugin's module calls
        use), after the language model ran once. ``losses`` are added to the loss and
        logged; ``metrics`` are only logged. Both are logged as the mean over the batches
        (steps x ranks) since the last logging step that had image rows and kept their terms;
        a text-only batch adds nothing to them. Every rank must build the same graph: on a
        batch without images return zero-valued terms and make the same module calls.
        """
        raise NotImplementedError

    def review(self, logged: Mapping[str, float]) -> Optional[Verdict]:
        """Judge a logging step from what is logged there (every rank sees the same values).

        Return None to say nothing (the default), or a :class:`Verdict`: its message is
        printed once, ``plugin_guard_warnings`` counts it, and ``stop=True`` saves a
        checkpoint and ends the run at this step.
        """
        return None

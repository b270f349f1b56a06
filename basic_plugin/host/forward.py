"""One model forward per step that also computes the plugins' losses.

The host's model classes put :class:`PluginForwardMixin` in front of LLaVA's
own class (same class name, so ``config.json`` stays vanilla). In training, the
mixin splices the images with LLaVA's own ``prepare_inputs_labels_for_multimodal``,
re-derives the image positions, runs the language model once (with hidden
states when a plugin asked), and adds the plugins' named terms to the loss,
all inside ``forward`` so ZeRO-3 gathers and reduces as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from basic_plugin.host.plugins import has_auxiliary_losses, pm
from basic_plugin.host.positions import ImagePositions, image_token_positions


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


class PluginForwardMixin:
    """Adds the plugins' auxiliary losses inside LLaVA's training forward."""

    #: detached named terms of the last training forward, read by the trainer
    plugin_terms: dict
    #: why the plugin terms were left out of the last step ("nonfinite", "image_rows"), or None
    plugin_skipped: Optional[str] = None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        images=None,
        image_sizes=None,
        return_dict=None,
    ):
        llava_forward = super().forward
        plain = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, images=images, image_sizes=image_sizes,
            return_dict=return_dict,
        )
        if (not self.training or labels is None or inputs_embeds is not None or images is None
                or input_ids is None or not has_auxiliary_losses()):
            return llava_forward(**plain)
        if isinstance(images, list) or images.ndim == 5:
            raise NotImplementedError("plugin losses support LLaVA-1.5's single-resolution images, not anyres")

        captured = []
        encode_images = self.encode_images

        def capture(imgs):
            features = encode_images(imgs)
            captured.append(features)
            return features

        self.encode_images = capture
        try:
            (_, new_position_ids, new_mask, past_key_values, embeds, new_labels) = \
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        finally:
            del self.encode_images
        features = captured[0]
        positions = image_token_positions(
            input_ids, attention_mask, features.shape[1],
            max_length=getattr(self.config, "tokenizer_model_max_length", None),
            padding_side=getattr(self.config, "tokenizer_padding_side", "right"),
        )
        want_hidden = any(pm.hook.llava_wants_hidden_states(model=self))
        outputs = llava_forward(
            input_ids=None, attention_mask=new_mask, position_ids=new_position_ids,
            past_key_values=past_key_values, inputs_embeds=embeds, labels=new_labels,
            use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=True if want_hidden else output_hidden_states,
            return_dict=True,
        )
        mask = new_mask.bool() if new_mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        batch = ForwardBatch(input_ids, attention_mask, images, mask, new_position_ids, new_labels, features)
        rows_ok = rows_match(embeds, features, positions)
        if not rows_ok:  # keep every module call (ZeRO-3), but supervise nothing this step
            positions = empty_like_positions(positions)
        outputs.loss = self._add_plugin_losses(outputs, batch, positions, rows_ok)
        if want_hidden and not output_hidden_states:
            outputs.hidden_states = None  # release them before backward bookkeeping
        if return_dict is False:
            return outputs.to_tuple()
        return outputs

    def _add_plugin_losses(self, outputs, batch: ForwardBatch, positions: ImagePositions, rows_ok: bool = True):
        lm_loss = outputs.loss
        terms = {}
        for result in pm.hook.llava_auxiliary_losses(
                model=self, batch=batch, outputs=outputs, image_positions=positions):
            for name, value in (result or {}).items():
                if name in terms or name == "lm_loss":
                    raise ValueError(f"two plugins return a loss term named {name!r}")
                terms[name] = value
        # (no terms means no plugin active: the same on every rank, so no all-reduce is needed)
        finite = not terms or all_ranks_agree(
            all(bool(torch.isfinite(v.detach()).all()) for v in terms.values()), lm_loss.device)
        self.plugin_skipped = None if finite and rows_ok else ("nonfinite" if not finite else "image_rows")
        total = lm_loss
        if finite:  # otherwise train on the LM loss alone this step, on every rank alike
            for value in terms.values():
                total = total + value.to(lm_loss.dtype)
        self.plugin_terms = {"lm_loss": lm_loss.detach(),
                             **{k: (v.detach() if finite else torch.zeros_like(v.detach())) for k, v in terms.items()}}
        return total


def rows_match(embeds: torch.Tensor, features: torch.Tensor, positions: ImagePositions) -> bool:
    """The re-derived image rows of the LLM input hold exactly the projector output."""
    if positions.num_rows == 0:
        return True
    if int(positions.image_index.max()) >= features.shape[0] or positions.sequence_length != embeds.shape[1]:
        return False
    return torch.equal(embeds[positions.batch_index, positions.seq_index],
                       features[positions.image_index, positions.patch_index].to(embeds.dtype))


def empty_like_positions(positions: ImagePositions) -> ImagePositions:
    """No image rows, same batch: the plugins still make their module calls."""
    empty = {k: (v[:0] if torch.is_tensor(v) and v.dim() == 1 and k != "has_image" else v)
             for k, v in positions.__dict__.items()}
    empty["has_image"] = torch.zeros_like(positions.has_image)
    return ImagePositions(**empty)


def all_ranks_agree(flag: bool, device) -> bool:
    """True only if ``flag`` holds on every rank (one tiny all-reduce when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


_cache: dict[type, type] = {}


def with_plugin_forward(llava_cls: type) -> type:
    """LLaVA's model class with the plugin forward in front; the class name is unchanged."""
    if issubclass(llava_cls, PluginForwardMixin):
        return llava_cls
    if llava_cls not in _cache:
        _cache[llava_cls] = type(llava_cls.__name__, (PluginForwardMixin, llava_cls), {
            "__module__": __name__, "__qualname__": llava_cls.__name__,
            "__doc__": f"{llava_cls.__name__} with basic-llava's plugin losses in forward.",
        })
    return _cache[llava_cls]

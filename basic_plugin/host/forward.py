"""One model forward per step that also computes the plugins' losses.

The host's model classes put :class:`PluginForwardMixin` in front of LLaVA's
own class (same class name, so ``config.json`` stays vanilla). In training, the
mixin splices the images with LLaVA's own ``prepare_inputs_labels_for_multimodal``,
re-derives the image positions, runs the language model once (with hidden
states when a plugin asked), and adds the plugins' named terms to the loss,
all inside ``forward`` so ZeRO-3 gathers and reduces as usual.
"""
from __future__ import annotations

import torch

from basic_plugin.host.binding import Binding, StepRecord, binding_of
from basic_plugin.host.contract import ForwardBatch
from basic_plugin.host.positions import ImagePositions, image_token_positions


class PluginForwardMixin:
    """Adds the bound objectives' loss terms inside LLaVA's training forward.

    With no objective bound to the model (no plugin on for the run), ``forward`` is
    LLaVA's own, called as is.
    """

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
        binding = binding_of(self)
        if (binding is None or not self.training or labels is None or inputs_embeds is not None
                or images is None or input_ids is None):
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
        want_hidden = binding.wants_hidden_states
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
        outputs.loss = self._add_plugin_losses(binding, outputs, batch, positions, rows_ok)
        if want_hidden and not output_hidden_states:
            outputs.hidden_states = None  # release them before backward bookkeeping
        if return_dict is False:
            return outputs.to_tuple()
        return outputs

    def _add_plugin_losses(self, binding: Binding, outputs, batch: ForwardBatch, positions: ImagePositions,
                           rows_ok: bool = True):
        lm_loss = outputs.loss
        terms, metrics = {}, {}
        for objective in binding.objectives:
            losses, values = objective.terms(self, batch, outputs, positions)
            for name, value in (*(losses or {}).items(), *(values or {}).items()):
                if name in terms or name in metrics or name == "lm_loss":
                    raise ValueError(f"two objectives log a value named {name!r}")
            terms.update(losses or {})
            metrics.update(values or {})
        # One decision for every rank (one tiny all-reduce), so the graphs stay identical; the
        # one host read per step of the plugin path: a NaN term must stay out of the graph.
        checks = [torch.isfinite(v.detach()).all() for v in terms.values()] or [torch.ones((), dtype=torch.bool)]
        flags = torch.stack([torch.stack([c.to(lm_loss.device) for c in checks]).all(),
                             torch.isfinite(lm_loss.detach()).all(),
                             torch.tensor(not binding.interrupt_requested, device=lm_loss.device)])
        terms_finite, lm_finite, uninterrupted = all_ranks_agree(flags, lm_loss.device)
        binding.interrupt_agreed = binding.interrupt_agreed or not uninterrupted  # Ctrl-C on any rank
        skipped = None if terms_finite and rows_ok else ("nonfinite" if not terms_finite else "image_rows")
        total = lm_loss
        if terms_finite:  # otherwise train on the LM loss alone this step, on every rank alike
            for value in terms.values():
                total = total + value.to(lm_loss.dtype)
        logged = {"lm_loss": lm_loss.detach(),
                  **{k: (v.detach() if terms_finite else torch.zeros_like(v.detach())) for k, v in terms.items()}}
        binding.last_step = StepRecord(terms=logged, skipped=skipped, lm_finite=lm_finite)
        # the plugins' values count only for a batch with image rows whose terms were kept (a text-only
        # batch's zeros would dilute them); lm_loss counts for every batch
        plugin_values = {k: v for k, v in logged.items() if k != "lm_loss"}
        binding.accumulator.add({"lm_loss": logged["lm_loss"]}, {**plugin_values, **metrics},
                                counted=positions.num_rows > 0 and skipped is None)
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


def all_ranks_agree(flags, device):
    """Each flag made True only if it holds on every rank: a bool gives a bool, a bool tensor a list.

    One tiny all-reduce when distributed, and one host read.
    """
    import torch.distributed as dist

    single = isinstance(flags, bool)
    value = torch.tensor([float(flags)], device=device) if single else flags.detach().to(device, torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    agreed = [v > 0 for v in value.tolist()]
    return agreed[0] if single else agreed


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

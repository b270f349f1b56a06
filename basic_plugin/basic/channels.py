"""The LLM's massive-activation channels, found from the LLM itself, and BASIC's target variants.

LLMs keep a few hidden channels with huge, nearly input-independent values ("massive
activations", Sun et al. 2024): in SmolLM2-135M three of 576 channels hold about 60% of the
refined target's energy on every token, in LLaMA-2/Vicuna dimensions such as 1415 and 2533 carry
them. A direction loss towards such a target mostly pulls the projector into those channels
(docs/RESULTS.md). Two variants of the target, both off by default (the paper):

* ``--basic_drop_channels``: leave the channels C out of both terms. The direction term is the
  cosine between v and vhat over the other channels, and the distribution term's logits are
  computed from v and vhat with the channels in C set to zero (equivalently E without those
  columns). ``auto`` finds C before training with :func:`channel_statistic`; an integer N takes
  the N channels with the largest statistic.
* ``--basic_standardize_target``: each channel of vhat standardised over the micro-batch's image
  tokens (zero mean, unit variance), so that no channel leads the direction by its scale alone.

**The statistic** (:func:`channel_statistic`): a fixed English text (:data:`PROBE_TEXT`) runs
through the LLM's first k decoder layers; for each channel c, ``m_c`` is the mean of ``|h_l[c]|``
over the probe's tokens and the layers l = 1..k (the layers the target averages), and the
statistic is ``m_c / median_c'(m_c')``: how many times the median channel's magnitude the
channel carries. ``auto`` drops the channels whose statistic is at least :data:`AUTO_RATIO` (10).
On SmolLM2-135M at k = 15 that is channels 507, 247 and 308 (75.0x, 35.2x, 14.8x; the next,
230, is at 7.6x); they hold 60% of the target's squared norm on the probe. No image, projector or training is needed, so the choice is the same for every run of
an LLM.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

#: a neutral English text; its token count depends on the tokenizer (about 100 for Llama-2's)
PROBE_TEXT = (
    "The museum opened its doors early on Saturday morning. A small girl in a red coat held her "
    "father's hand and pointed at a painting of boats on a grey sea. Outside, the market sold "
    "apples, bread, cheese and flowers, and a man played the violin near the fountain. In 1887 "
    "the bridge was rebuilt with stone from the northern hills; today cars, bicycles and buses "
    "cross it every few seconds. Photos of animals, streets and kitchens fill the old albums."
)
#: ``auto`` drops a channel whose mean |h| is at least this many times the median channel's
AUTO_RATIO = 10.0


class _Enough(Exception):
    """Raised by the last hooked layer to stop the probe's forward: deeper layers are not needed."""


def _gathered(params: Sequence[torch.nn.Parameter]):
    """ZeRO-3 partitions weights: gather these for the probe (a collective: every rank calls it)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def probe_states(model, input_ids: torch.Tensor, depth: int) -> List[torch.Tensor]:
    """``[h_1, ..., h_k]`` of ``input_ids`` (1, T) through the LLaVA model's LLM, fp32, without gradient.

    Runs only the embedding and the first ``depth`` decoder layers (a forward hook on layer k ends
    the pass), in eval mode, under ZeRO-3 with exactly those weights gathered. Works on the model as
    ``llava_objective`` receives it (before DeepSpeed's engine), on whatever device its weights are.
    """
    llm = model.get_model()
    layers = llm.layers
    if not 1 <= depth <= len(layers):
        raise ValueError(f"probe depth {depth} is out of range 1..{len(layers)}")
    states: List[torch.Tensor] = []

    def keep(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach().float())
        if len(states) == depth:
            raise _Enough

    params = [*llm.embed_tokens.parameters(), *(p for layer in layers[:depth] for p in layer.parameters())]
    hooks = [layers[i].register_forward_hook(keep) for i in range(depth)]
    was_training = llm.training
    llm.eval()
    try:
        with torch.no_grad(), _gathered(params):
            device = llm.embed_tokens.weight.device
            try:
                llm(input_ids=input_ids.to(device), use_cache=False, return_dict=True)
            except _Enough:
                pass
    finally:
        for h in hooks:
            h.remove()
        llm.train(was_training)
    if len(states) != depth:
        raise RuntimeError(f"the probe saw {len(states)} of {depth} layers")
    return states


def probe_ids(tokenizer, text: str = PROBE_TEXT) -> torch.Tensor:
    """The probe's token ids (1, T), with the tokenizer's own BOS handling."""
    return torch.tensor([tokenizer(text).input_ids], dtype=torch.long)


def channel_statistic(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per channel: mean |h| over tokens and layers, divided by the median channel's (float64, (d,))."""
    mags = torch.stack([h.reshape(-1, h.shape[-1]).double().abs().mean(0) for h in states]).mean(0)
    return mags / torch.quantile(mags, 0.5).clamp_min(1e-30)  # the median (middle pair's mean for even d)


def choose_channels(statistic: torch.Tensor, spec: str) -> List[int]:
    """The channels to drop for ``--basic_drop_channels spec``, largest statistic first.

    ``"0"``: none (the paper); ``"auto"``: statistic >= :data:`AUTO_RATIO`; ``"N"``: the top N.
    """
    order = torch.argsort(statistic, descending=True, stable=True).tolist()
    if spec == "auto":
        return [c for c in order if float(statistic[c]) >= AUTO_RATIO]
    count = int(spec)
    if count > len(order):
        raise ValueError(f"--basic_drop_channels {spec}: the LLM has {len(order)} channels")
    return order[:count]


def same_on_every_rank(channels: List[int]) -> List[int]:
    """Rank 0's choice on every rank (every rank computes its own; floats could round apart across devices)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return channels
    box = [channels]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


def energy_share(x: torch.Tensor, channels: Sequence[int]) -> float:
    """Mean over rows of the part of each row's squared norm in ``channels`` (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    if not len(channels) or x.shape[0] == 0:
        return 0.0
    sq = x.pow(2)
    return float((sq[:, list(channels)].sum(1) / sq.sum(1).clamp_min(1e-300)).mean())


def find_massive_channels(model, tokenizer, depth: int, spec: str) -> dict:
    """Run the probe and choose the channels for ``spec``; the result, and why, for the log.

    Every rank runs the probe (under ZeRO-3 the gather is collective); rank 0's choice is used by all.
    """
    from basic_plugin.basic.losses import refined_target

    states = probe_states(model, probe_ids(tokenizer), depth)
    statistic = channel_statistic(states)
    channels = same_on_every_rank(choose_channels(statistic, spec))
    target = refined_target([h[0] for h in states])
    return {"channels": channels, "ratios": [float(statistic[c]) for c in channels], "depth": depth,
            "probe_tokens": int(states[0].shape[1]), "target_share": energy_share(target, channels),
            "hidden_size": int(statistic.numel())}


def describe(found: dict, spec: str) -> str:
    """One line for the training log: which channels, and why."""
    chans = found["channels"]
    rule = f">= {AUTO_RATIO:g}x the median channel's" if spec == "auto" else f"the top {spec}"
    if not chans:
        return (f"--basic_drop_channels {spec}: no channel of {found['hidden_size']} reaches {AUTO_RATIO:g}x the "
                f"median channel's mean |h| over the probe at layers 1..{found['depth']}: nothing is dropped")
    ratios = ", ".join(f"{c} ({r:.1f}x)" for c, r in zip(chans, found["ratios"]))
    return (f"--basic_drop_channels {spec}: leaving channels {ratios} of {found['hidden_size']} out of both terms "
            f"(mean |h| over a {found['probe_tokens']}-token text probe at layers 1..{found['depth']}, {rule}); "
            f"they hold {100 * found['target_share']:.1f}% of the target's squared norm on the probe")


def standardize_rows(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each column (channel) of ``target`` (N, d) to zero mean and unit variance over the N rows, fp32
    (float64 stays float64); population statistics, the std floored at ``eps``. No rows: unchanged."""
    if target.shape[0] == 0:
        return target
    t = target.detach().to(torch.promote_types(target.dtype, torch.float32))
    mean = t.mean(0, keepdim=True)
    std = t.std(0, unbiased=False, keepdim=True).clamp_min(eps)
    return (t - mean) / std


def keep_mask(channels: Sequence[int], hidden_size: int, device, dtype) -> Optional[torch.Tensor]:
    """(d,) ones with zeros at ``channels`` (None when there is nothing to drop)."""
    if not len(channels):
        return None
    mask = torch.ones(hidden_size, device=device, dtype=dtype)
    mask[list(channels)] = 0
    return mask

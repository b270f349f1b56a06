"""BASIC per-patch weights a_i (docs/DECISIONS.md, decision D3), recomputed from hidden states.

    a_i = mean over decoder layers l = 1..k, over all attention heads, and over the text
          query tokens j that come after the image, of softmax-attention(query j -> key i)

The attention probabilities are not returned by SDPA or FlashAttention-2, so they are
recomputed from the hidden states of the same forward pass (``output_hidden_states``):
for layer l the input of that layer is ``hidden_states[l-1]``; the layer's own
``input_layernorm``, ``self_attn.q_proj`` (query rows only), ``self_attn.k_proj`` and
rotary embedding (with ``apply_rotary_pos_emb`` of the attention class's own modeling
module) give q and k; scores are ``q k^T / sqrt(head_dim)`` with grouped-query attention,
a causal mask and a padding mask, and the softmax is taken in float32.  The result does
not depend on the attention implementation the model ran with.

Memory: query rows are processed per sample in chunks of ``query_chunk``; the largest
temporary is ``heads x query_chunk x L`` float32, never the ``L x L`` matrix of all heads.

DeepSpeed ZeRO-3: parameters are gathered by module hooks, so every rank must issue the
same module calls.  For each layer 1..k, ``input_layernorm``, ``q_proj`` and ``k_proj``
are each called exactly once per call of :func:`image_attention_mass`, on the whole batch
(the query rows of all samples are gathered into one tensor for ``q_proj``), also when
there are no image rows or no queries (``q_proj`` then runs on an empty tensor).  No
``.weight`` is read directly, so peft LoRA-wrapped projections work (the module is called).

Decisions:
- Queries of image row i (sample b, block ending at ``block_end[i]``) are the positions
  j > block_end[i] of sample b with attention_mask 1 that are not image rows themselves
  (the tokens of a later image are not text queries).  A row without queries gets 0.
- Position ids default to ``arange(L)`` for every row, which is what transformers 4.37.2
  ``LlamaModel``/``MistralModel`` use when ``position_ids`` is None (also with left
  padding).  Pass the model's ``position_ids`` if the forward pass received some.
- q and k are projected and rotated in the dtype of the hidden states (as the model does),
  then cast to float32 for the scores and the softmax.
- The projections are called with their modules (and submodules, e.g. LoRA dropout)
  temporarily in eval mode, so that a_i is deterministic; the training flags are restored.
- Mistral's sliding window is not applied (full causal attention).  transformers 4.37.2
  is itself inconsistent here (eager masks j - i >= window, SDPA ignores the window,
  FlashAttention-2 uses j - i > window only when L > window); LLaVA sequences (2048)
  are shorter than Mistral's 4096 window, where all agree.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Sequence

import torch

from basic_plugin.basic.arguments import flag_default

__all__ = ["image_attention_mass"]


def _layer_parts(layer, index: int):
    """Return (input_layernorm, attn, q_proj, k_proj, rotary_emb, apply_rope, H, Hkv, hd)."""
    where = f"decoder layer {index} ({type(layer).__name__})"
    norm = getattr(layer, "input_layernorm", None)
    attn = getattr(layer, "self_attn", None)
    if norm is None or attn is None:
        raise TypeError(
            f"image_attention_mass: {where} has no `input_layernorm`/`self_attn`; expected a "
            "LlamaDecoderLayer or MistralDecoderLayer of transformers 4.37.2"
        )
    missing = [
        name
        for name in ("q_proj", "k_proj", "rotary_emb", "num_heads", "num_key_value_heads", "head_dim")
        if getattr(attn, name, None) is None
    ]
    if missing:
        raise TypeError(
            f"image_attention_mass: the attention module of {where} ({type(attn).__name__}) lacks "
            f"{missing}; expected a Llama/Mistral attention of transformers 4.37.2"
        )
    module = sys.modules.get(type(attn).__module__)
    apply_rope = getattr(module, "apply_rotary_pos_emb", None)
    if apply_rope is None:
        raise TypeError(
            f"image_attention_mass: module {type(attn).__module__!r} of {type(attn).__name__} has no "
            "`apply_rotary_pos_emb`"
        )
    num_heads = int(attn.num_heads)
    num_kv = int(attn.num_key_value_heads)
    head_dim = int(attn.head_dim)
    if num_kv <= 0 or num_heads % num_kv != 0:
        raise ValueError(f"image_attention_mass: {where}: num_heads {num_heads} not a multiple of {num_kv}")
    groups = getattr(attn, "num_key_value_groups", num_heads // num_kv)
    if int(groups) * num_kv != num_heads:
        raise ValueError(f"image_attention_mass: {where}: inconsistent num_key_value_groups {groups}")
    return norm, attn, attn.q_proj, attn.k_proj, attn.rotary_emb, apply_rope, num_heads, num_kv, head_dim


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]):
    """Put modules (and their children) in eval mode; restore every training flag after."""
    saved = []
    for module in modules:
        for sub in module.modules():
            saved.append((sub, sub.training))
    try:
        for module in modules:
            module.train(False)
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def _rotary(rotary_emb, x: torch.Tensor, seq_len: int):
    try:
        cos, sin = rotary_emb(x, seq_len=seq_len)
    except TypeError as err:  # e.g. transformers >= 4.38 (rotary_emb(x, position_ids))
        raise TypeError(
            "image_attention_mass: `self_attn.rotary_emb(x, seq_len=...)` failed; this function "
            f"supports the transformers 4.37 rotary API ({err})"
        ) from err
    return cos, sin


@torch.no_grad()
def image_attention_mass(
    layers,
    hidden_states,
    attention_mask,
    batch_index,
    seq_index,
    block_end,
    *,
    depth,
    position_ids=None,
    query_chunk=flag_default("basic_query_chunk"),
) -> torch.Tensor:
    """Per image row, the mean attention probability it receives from later text tokens.

    Args:
        layers: the decoder layer ``ModuleList`` (Llama/Mistral layers, transformers 4.37.2).
        hidden_states: ``output_hidden_states`` tuple (len >= depth + 1), each (B, L, d).
        attention_mask: (B, L) 0/1 or bool, or None (all positions valid).
        batch_index, seq_index: (M,) long, the image-token rows (sample, position).
        block_end: (M,) long, position of the last token of the image block of each row.
        depth: k, the number of layers averaged (1 <= k <= len(layers)).
        position_ids: optional (B, L) (or (1, L) / (L,)) position ids; default arange(L).
        query_chunk: number of query rows processed at once.

    Returns:
        (M,) float32: mean over layers 1..k, heads and the row's queries (text tokens after
        its image block, valid, not image tokens) of softmax attention to the row's key;
        0 for rows without queries.
    """
    depth = int(depth)
    num_layers = len(layers)
    if not 1 <= depth <= num_layers:
        raise ValueError(f"image_attention_mass: depth must be in [1, {num_layers}], got {depth}")
    if len(hidden_states) < depth + 1:
        raise ValueError(
            f"image_attention_mass: need at least depth + 1 = {depth + 1} hidden states, got {len(hidden_states)}"
        )
    query_chunk = int(query_chunk)
    if query_chunk < 1:
        raise ValueError(f"image_attention_mass: query_chunk must be >= 1, got {query_chunk}")
    parts = [_layer_parts(layers[l], l) for l in range(depth)]

    h0 = hidden_states[0]
    if h0.dim() != 3:
        raise ValueError(f"image_attention_mass: hidden states must be (B, L, d), got {tuple(h0.shape)}")
    bsz, seq_len, _ = h0.shape
    device = h0.device

    if attention_mask is None:
        valid = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    else:
        if tuple(attention_mask.shape) != (bsz, seq_len):
            raise ValueError(
                f"image_attention_mass: attention_mask must be (B, L) = {(bsz, seq_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(device=device) != 0

    batch_index = torch.as_tensor(batch_index, device=device).long().reshape(-1)
    seq_index = torch.as_tensor(seq_index, device=device).long().reshape(-1)
    block_end = torch.as_tensor(block_end, device=device).long().reshape(-1)
    num_rows = batch_index.numel()
    if seq_index.numel() != num_rows or block_end.numel() != num_rows:
        raise ValueError("image_attention_mass: batch_index, seq_index and block_end must have the same length")

    if position_ids is None:
        positions = torch.arange(seq_len, device=device).unsqueeze(0).expand(bsz, seq_len)
    else:
        positions = torch.as_tensor(position_ids, device=device).long()
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[-1] != seq_len or positions.shape[0] not in (1, bsz):
            raise ValueError(
                f"image_attention_mass: position_ids must be (B, L) = {(bsz, seq_len)}, got {tuple(positions.shape)}"
            )
        positions = positions.expand(bsz, seq_len)
    rope_len = seq_len
    if position_ids is not None and positions.numel() > 0:
        rope_len = max(seq_len, int(positions.max().item()) + 1)

    # --- which positions are queries, per sample -------------------------------------
    is_img = torch.zeros(bsz, seq_len, dtype=torch.bool, device=device)
    first_end = torch.full((bsz,), seq_len, dtype=torch.long, device=device)
    if num_rows > 0:
        if bool(((batch_index < 0) | (batch_index >= bsz) | (seq_index < 0) | (seq_index >= seq_len)).any()):
            raise ValueError("image_attention_mass: batch_index/seq_index out of range")
        if bool((block_end < seq_index).any()):
            raise ValueError("image_attention_mass: block_end must be >= seq_index for every row")
        is_img[batch_index, seq_index] = True
        first_end.scatter_reduce_(0, batch_index, block_end, reduce="amin", include_self=True)
    arange_l = torch.arange(seq_len, device=device)
    query_mask = valid & ~is_img & (arange_l.unsqueeze(0) > first_end.unsqueeze(1))
    q_batch, q_pos = query_mask.nonzero(as_tuple=True)  # sorted by sample, then position
    q_counts = torch.bincount(q_batch, minlength=bsz).tolist()
    q_offsets = [0]
    for c in q_counts:
        q_offsets.append(q_offsets[-1] + c)
    q_positions = positions[q_batch, q_pos]

    # image rows grouped per sample (indices into the M rows), with their query counts
    result = torch.zeros(num_rows, dtype=torch.float64, device=device)
    per_sample = []  # (b, row_ids, key positions, block ends, query slice)
    if num_rows > 0:
        row_counts = torch.bincount(batch_index, minlength=bsz).tolist()
        order = torch.argsort(batch_index, stable=True)
        start = 0
        for b in range(bsz):
            rows = order[start : start + row_counts[b]]
            start += row_counts[b]
            if rows.numel() == 0 or q_counts[b] == 0:
                continue
            qs = slice(q_offsets[b], q_offsets[b + 1])
            per_sample.append((b, rows, seq_index[rows], block_end[rows], qs))
    num_queries = torch.zeros(num_rows, dtype=torch.float64, device=device)
    for b, rows, _keys, ends, qs in per_sample:
        pos_b = q_pos[qs]  # ascending
        n_after = pos_b.numel() - torch.searchsorted(pos_b, ends, right=True)
        num_queries[rows] = n_after.to(torch.float64)

    for layer_idx in range(depth):
        norm, attn, q_proj, k_proj, rotary_emb, apply_rope, num_heads, num_kv, head_dim = parts[layer_idx]
        groups = num_heads // num_kv
        scale = 1.0 / math.sqrt(head_dim)
        hidden = hidden_states[layer_idx]
        if tuple(hidden.shape[:2]) != (bsz, seq_len):
            raise ValueError(f"image_attention_mass: hidden_states[{layer_idx}] has shape {tuple(hidden.shape)}")

        # the only module calls: once per module per layer, on the whole batch
        with _eval_mode([norm, q_proj, k_proj]):
            normed = norm(hidden)  # (B, L, d)
            q = q_proj(normed[q_batch, q_pos])  # (Nq, H * hd)
            k = k_proj(normed)  # (B, L, Hkv * hd)

        q = q.view(1, -1, num_heads, head_dim).transpose(1, 2)  # (1, H, Nq, hd)
        k = k.view(bsz, seq_len, num_kv, head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        cos, sin = _rotary(rotary_emb, k, rope_len)
        q = apply_rope(q, q[:, :0], cos, sin, q_positions.unsqueeze(0))[0]
        k = apply_rope(k[:, :0], k, cos, sin, positions)[1]
        q = q.squeeze(0).transpose(0, 1).float()  # (Nq, H, hd)
        k = k.float()  # (B, Hkv, L, hd)

        for b, rows, keys, ends, qs in per_sample:
            k_b = k[b]  # (Hkv, L, hd)
            valid_b = valid[b]
            q_b = q[qs]
            pos_b = q_pos[qs]
            for c0 in range(0, q_b.shape[0], query_chunk):
                qc = q_b[c0 : c0 + query_chunk]  # (C, H, hd)
                jc = pos_b[c0 : c0 + query_chunk]  # (C,)
                n_c = qc.shape[0]
                qc = qc.view(n_c, num_kv, groups, head_dim)
                scores = torch.einsum("cngd,nld->ngcl", qc, k_b) * scale  # (Hkv, G, C, L)
                allowed = valid_b.unsqueeze(0) & (arange_l.unsqueeze(0) <= jc.unsqueeze(1))  # (C, L)
                scores = scores.masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                to_img = probs[..., keys].sum(dim=(0, 1))  # (C, m_b)
                after = jc.unsqueeze(1) > ends.unsqueeze(0)  # (C, m_b)
                result.index_add_(0, rows, (to_img * after).sum(0).to(torch.float64) / num_heads)
                del scores, probs, to_img

    denom = num_queries * depth
    out = torch.where(denom > 0, result / denom.clamp_min(1.0), torch.zeros_like(result))
    return out.to(torch.float32)

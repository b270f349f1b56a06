"""The target-layer rule: which LLM layers form BASIC's refined target, with which weights.

One place for it, used by the objective, the loss, the patch weights, the flags, the lens
and the benchmark. Layers are counted as in transformers' ``output_hidden_states``:
``hidden_states[l]`` is the output of decoder layer ``l`` (``hidden_states[0]`` the input
embeddings). The target averages layers 1..k with weights l^2; the patch weights read the
attention of the same k layers (decoder layer ``l`` sees ``hidden_states[l - 1]``).
``hidden_states[L]`` is taken after the model's final norm, which the method does not use,
so k < L (docs/DECISIONS.md, D5).
"""
from __future__ import annotations


def default_depth(num_layers: int) -> int:
    """The paper's k: half the LLM's layers (16 for 7B, 20 for 13B)."""
    return max(1, num_layers // 2)


def depth_range(num_layers: int) -> str:
    """The allowed depths, as the flag's error message says them."""
    return f"1..{num_layers - 1} (depth {num_layers} would take the final-normed state)"


def valid_depth(depth: int, num_layers: int) -> bool:
    return 1 <= depth < num_layers


def target_layers(depth: int) -> list[int]:
    """Indices into ``output_hidden_states`` of the target's layers: 1..k."""
    return list(range(1, depth + 1))


def target_weights(depth: int) -> list[float]:
    """``w_l = l^2 / sum_{j<=k} j^2`` for l = 1..k (deeper shallow layers refine more)."""
    denom = depth * (depth + 1) * (2 * depth + 1) / 6.0
    return [l * l / denom for l in target_layers(depth)]

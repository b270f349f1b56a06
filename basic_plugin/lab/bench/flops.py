"""Analytical FLOP model of a LLaVA training step and of BASIC's extra work.

The measured whole-step overhead is judged against BASIC's share of the step's FLOPs: a
timing says little on its own (machines and loads differ), the share says what the
overhead should be. :func:`reference_flop_rows` gives the share for Vicuna-7B and -13B
with LLaVA-1.5's CLIP tower; :func:`flop_share` does the same for any measured model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from basic_plugin.basic.target import default_depth

__all__ = ["LLMShape", "TowerShape", "Workload", "VICUNA_7B", "VICUNA_13B", "CLIP_L_336", "SMOLLM2_135M",
           "DINOV2_S_224", "PRETRAIN_TEXT", "FINETUNE_TEXT", "step_flops", "basic_flops", "flop_share",
           "reference_flop_rows", "llm_shape_of", "tower_shape_of"]


@dataclass
class LLMShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """Weights used in matmuls per token: attention q/k/v/o, SwiGLU MLP, lm_head."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (q_o + k_v + mlp) + self.hidden * self.vocab


@dataclass
class TowerShape:
    name: str
    hidden: int
    layers: int
    ffn: int
    tokens: int  # including the class token

    def forward_flops(self) -> float:
        per_layer = 2 * self.tokens * (4 * self.hidden ** 2 + 2 * self.hidden * self.ffn)
        per_layer += 4 * self.tokens ** 2 * self.hidden
        return float(self.layers * per_layer)


@dataclass
class Workload:
    """One sample of a LLaVA stage, as BASIC sees it."""

    stage: str  # "pretrain" (LLM frozen) or "finetune" (LLM + projector trainable)
    image_tokens: int  # m
    before: int  # text tokens before the image (bos, system prompt, "USER:")
    after: int  # text tokens after the image (the queries of the patch weights)
    depth: int  # k
    vision_hidden: int = 1024
    vocab_grad: bool = True  # E trainable and not detached (finetune with --basic_vocab embed)
    checkpointing: bool = False  # gradient checkpointing: one more LLM forward
    patch_weights: str = "raw"

    @property
    def tokens(self) -> int:
        return self.before + self.image_tokens + self.after


VICUNA_7B = LLMShape("Vicuna-7B", 4096, 32, 32, 32, 11008, 32000)
VICUNA_13B = LLMShape("Vicuna-13B", 5120, 40, 40, 40, 13824, 32000)
CLIP_L_336 = TowerShape("CLIP ViT-L/14-336", 1024, 24, 4096, 577)
SMOLLM2_135M = LLMShape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152)
DINOV2_S_224 = TowerShape("DINOv2-S/14 @224", 384, 12, 1536, 257)

#: LLaVA-1.5 token counts per sample (see docs/PERFORMANCE.md): plain captions ~40 tokens;
#: v1 conversations ~35 tokens of system prompt + "USER:" before the image, ~565 after.
PRETRAIN_TEXT = (1, 40)
FINETUNE_TEXT = (35, 565)
KL_ELEMENTWISE = 16  # flops per (row, vocab) element: 2 log-softmax, 2 exp, KL, dz


def step_flops(llm: LLMShape, tower: Optional[TowerShape], wl: Workload) -> Dict[str, float]:
    """FLOPs of one LLaVA training step per sample, BASIC off.

    LLM forward = 2 * matmul_params * T + 4 * T^2 * d per layer (attention scores and
    values, full square). Backward: 2x the forward matmuls when the LLM is trained (input
    and weight gradients), 1x when frozen (pretraining: the gradient still flows through
    every layer to the projector, but no weight gradients); attention core backward 2x its
    forward either way. Gradient checkpointing adds one more forward. Vision tower: forward
    only (frozen, no grad). Projector (mlp2x_gelu): forward + 2x backward.
    """
    t = wl.tokens
    matmul_fwd = 2.0 * llm.matmul_params() * t
    attn_fwd = 4.0 * llm.layers * t * t * llm.heads * llm.head_dim
    bwd_factor = 2.0 if wl.stage == "finetune" else 1.0
    llm_total = (matmul_fwd + attn_fwd) * (2.0 if wl.checkpointing else 1.0) \
        + bwd_factor * matmul_fwd + 2.0 * attn_fwd
    proj = 2.0 * wl.image_tokens * (wl.vision_hidden * llm.hidden + llm.hidden ** 2)
    vision = tower.forward_flops() if tower is not None else 0.0
    total = llm_total + 3.0 * proj + vision
    return {"llm_fwd": matmul_fwd + attn_fwd, "llm_step": llm_total, "projector": 3.0 * proj,
            "vision": vision, "total": total}


def basic_flops(llm: LLMShape, wl: Workload) -> Dict[str, float]:
    """BASIC's extra FLOPs per sample.

    KL over the vocabulary: z_s = s E^T and z_t = t E^T (2 matmuls of m x d x V), the
    student gradient dz E (1 more), the vocabulary gradient dz^T s (1 more when E gets a
    gradient): (3 or 4) * 2 m d V, plus ~16 m V elementwise. Patch weights (raw/sum1),
    for each of the k layers, without grad: k_proj on all T tokens, q_proj on the queries
    (text after the image), scores queries x T for every head, softmax; norm and rotary
    are counted as elementwise. Target and direction loss: ~(2k + 20) m d.
    """
    m, d, v = wl.image_tokens, llm.hidden, llm.vocab
    t, nq = wl.tokens, wl.after
    kl_mm = (4 if wl.vocab_grad else 3) * 2.0 * m * d * v
    kl_elem = float(KL_ELEMENTWISE * m * v)
    if wl.patch_weights == "uniform":
        patch = 0.0
    else:
        per_layer = (2.0 * t * d * llm.kv_heads * llm.head_dim + 2.0 * nq * d * llm.heads * llm.head_dim
                     + 2.0 * nq * t * llm.heads * llm.head_dim + 5.0 * llm.heads * nq * t
                     + 6.0 * t * d)
        patch = wl.depth * per_layer
    small = (2.0 * wl.depth + 20.0) * m * d
    total = kl_mm + kl_elem + patch + small
    return {"kl_matmul": kl_mm, "kl_elementwise": kl_elem, "patch_weights": patch,
            "target_das": small, "total": total}


def flop_share(llm: LLMShape, tower: Optional[TowerShape], wl: Workload) -> Dict[str, float]:
    """BASIC's extra FLOPs as a share of the step without it (``share``), with the parts."""
    step = step_flops(llm, tower, wl)
    extra = basic_flops(llm, wl)
    return {"step_off": step["total"], "basic": extra["total"], "share": extra["total"] / step["total"],
            "kl_matmul": extra["kl_matmul"], "patch_weights": extra["patch_weights"],
            "kl_elementwise": extra["kl_elementwise"]}


def reference_flop_rows() -> List[Dict[str, object]]:
    """The share for Vicuna-7B/-13B with CLIP ViT-L/14-336, both stages, with and without
    gradient checkpointing, at depth k = layers / 2 (LLaVA-1.5's token counts)."""
    rows = []
    for llm in (VICUNA_7B, VICUNA_13B):
        for stage, (before, after) in (("pretrain", PRETRAIN_TEXT), ("finetune", FINETUNE_TEXT)):
            for ckpt in (False, True):
                wl = Workload(stage, 576, before, after, default_depth(llm.layers), vision_hidden=CLIP_L_336.hidden,
                              vocab_grad=stage == "finetune", checkpointing=ckpt)
                share = flop_share(llm, CLIP_L_336, wl)
                rows.append({"model": llm.name, "stage": stage, "tokens": wl.tokens, "depth": wl.depth,
                             "checkpointing": ckpt, **share})
    return rows


def llm_shape_of(model) -> LLMShape:
    """The LLM shape of a loaded LLaVA model (from its config)."""
    c = model.config
    return LLMShape(getattr(c, "_name_or_path", "") or type(model).__name__, c.hidden_size, c.num_hidden_layers,
                    c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads),
                    c.intermediate_size, c.vocab_size)


def tower_shape_of(model) -> TowerShape:
    """The vision tower shape of a loaded LLaVA model: a CLIP tower, or a DINOv2 one
    (whose config gives ``mlp_ratio`` instead of ``intermediate_size``)."""
    vc = model.get_model().get_vision_tower().config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    ffn = getattr(vc, "intermediate_size", None) or int(vc.hidden_size * vc.mlp_ratio)
    return TowerShape(type(model.get_model().get_vision_tower()).__name__, vc.hidden_size, vc.num_hidden_layers,
                      ffn, tokens)

"""The models whose whole training step is timed: ``tiny``, ``mini-shaped`` and ``mini``.

- ``tiny``: :mod:`basic_plugin.lab.tiny`'s LLaVA (seconds, always available);
- ``mini-shaped``: random weights with the real mini-LLaVA's shapes (FLOPs do not depend
  on the weights, so it stands in for the real one when that is not installed);
- ``mini``: the real-parts mini-LLaVA (SmolLM2-135M-Instruct + DINOv2-small at 224 px),
  from the ``basic-llava assets`` cache or a ``--mini-dir`` folder.

Each is loaded the way training loads it (LLaVA's classes with the plugin host's forward,
LLaVA's ``initialize_vision_modules``), with fixed seeds.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Dict, Optional, Tuple

import torch

from basic_plugin.lab.bench.flops import DINOV2_S_224, SMOLLM2_135M

__all__ = ["STEP_MODELS", "build_tiny", "build_mini_shaped", "mini_paths", "build_mini", "build_step_model"]

STEP_MODELS = ("tiny", "mini-shaped", "mini")


def _llava_classes():
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    from basic_plugin.host.forward import with_plugin_forward

    return LlavaConfig, with_plugin_forward(LlavaLlamaForCausalLM)


@contextlib.contextmanager
def _plugin_vision_towers():
    """LLaVA's ``build_vision_tower`` asks the plugins first inside the block (DINOv2 towers)."""
    import llava.model.llava_arch as arch

    from basic_plugin.host.integration import plugin_vision_tower_builder
    from basic_plugin.lab.towers import register_lab_plugins

    register_lab_plugins()
    original = arch.build_vision_tower
    if hasattr(original, "_llava_plugin_original"):  # the plugin host is applied already
        yield
        return
    arch.build_vision_tower = plugin_vision_tower_builder(original)
    try:
        yield
    finally:
        arch.build_vision_tower = original


def _attach_vision(model, vision_dir, max_length: int = 4096):
    margs = types.SimpleNamespace(
        vision_tower=str(vision_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat")
    model.get_model().initialize_vision_modules(model_args=margs)
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = max_length
    return model


def _write_clip(vision_dir, *, hidden, layers, heads, ffn, image_size, patch, seed=1):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=ffn, projection_dim=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
                           patch_size=patch, torch_dtype="float32")
    torch.manual_seed(seed)
    CLIPVisionModel(cfg).save_pretrained(vision_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       do_resize=True, do_center_crop=True, do_normalize=True,
                       do_convert_rgb=True).save_pretrained(vision_dir)


def build_tiny(workdir) -> object:
    """basic_plugin.lab.tiny's LLaVA (4 layers, d 64, 16 image tokens), loaded like training does."""
    from basic_plugin.lab.tiny import build_tiny_llava

    paths = build_tiny_llava(os.path.join(workdir, "tiny"), layers=4)
    _, cls = _llava_classes()
    torch.manual_seed(0)
    model = cls.from_pretrained(paths["lm"], attn_implementation="sdpa")
    return _attach_vision(model, paths["vision"])


def build_mini_shaped(workdir) -> object:
    """Random weights with the mini-LLaVA's shapes: SmolLM2-135M LLM, ViT-S/14 tower at 224 px.

    The tower is a CLIP ViT with DINOv2-S's geometry (12 layers, d 384, 6 heads, FFN 1536,
    patch 14, 256 patch tokens): the same FLOPs, loadable by LLaVA's own builder.
    """
    config_cls, cls = _llava_classes()
    s = SMOLLM2_135M
    config = config_cls(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e5,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config)
    vision_dir = os.path.join(workdir, "mini_shaped_vision")
    _write_clip(vision_dir, hidden=DINOV2_S_224.hidden, layers=DINOV2_S_224.layers, heads=6,
                ffn=DINOV2_S_224.ffn, image_size=224, patch=14)
    return _attach_vision(model, vision_dir)


def mini_paths(cache_dir=None) -> Dict[str, str]:
    """``{"lm", "vision"}`` of the installed real parts, or LookupError saying what is missing.

    Never downloads: the parts count as installed when every folder of the
    ``basic-llava assets`` cache exists; :func:`install_assets` then checks them against
    its manifest (cheap when they match) before they are used.
    """
    from basic_plugin.lab.assets import asset_paths, install_assets

    folders = asset_paths(cache_dir)
    missing = [key for key, folder in folders.items() if not (os.path.isdir(folder) and os.listdir(folder))]
    if missing:
        raise LookupError(f"the mini-LLaVA parts are not installed ({', '.join(missing)} missing under "
                          f"{os.path.dirname(folders[missing[0]])}); run `basic-llava assets`, "
                          "or pass --mini-dir DIR with lm/ and vision/")
    installed = install_assets(cache_dir, progress=False)
    return {"lm": installed["llm"], "vision": installed["vision"]}


def build_mini(workdir, mini_dir: Optional[str] = None) -> Tuple[Optional[object], Optional[str]]:
    """(the real-parts mini-LLaVA, None), or (None, why) when it is not available.

    ``mini_dir``: a folder with ``lm/`` (a Llama checkpoint) and ``vision/`` (a DINOv2 or
    CLIP folder); without it, the ``basic-llava assets`` cache (DINOv2-small at 224 px).
    """
    if mini_dir:
        paths = {"lm": os.path.join(mini_dir, "lm"), "vision": os.path.join(mini_dir, "vision")}
    else:
        try:
            paths = mini_paths()
        except LookupError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - report and go on
            return None, f"mini-LLaVA assets unavailable: {type(exc).__name__}: {exc}"
    try:
        _, cls = _llava_classes()
        torch.manual_seed(0)
        model = cls.from_pretrained(str(paths["lm"]), attn_implementation="sdpa")
        with _plugin_vision_towers():
            return _attach_vision(model, paths["vision"]), None
    except Exception as exc:  # noqa: BLE001
        return None, f"could not load the mini-LLaVA from {paths}: {type(exc).__name__}: {exc}"


def build_step_model(name: str, workdir, mini_dir: Optional[str] = None) -> Tuple[Optional[object], Optional[str]]:
    """(model, None) for one of :data:`STEP_MODELS`, or (None, why it is skipped)."""
    if name == "tiny":
        return build_tiny(workdir), None
    if name == "mini-shaped":
        return build_mini_shaped(workdir), None
    if name == "mini":
        return build_mini(workdir, mini_dir)
    raise ValueError(f"unknown step model {name!r} ({', '.join(STEP_MODELS)})")

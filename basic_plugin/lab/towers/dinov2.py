"""A DINOv2 vision tower for LLaVA, offered through the ``llava_build_vision_tower`` hook.

``DinoV2VisionTower`` has the interface of LLaVA's ``CLIPVisionTower`` (what
``LlavaMetaModel``/``LlavaMetaForCausalLM`` and ``train()`` use), backed by a transformers
``Dinov2Model`` folder such as the one ``basic_plugin.lab.assets.install_assets()`` writes.

The input resolution is the folder's image processor crop size (``preprocessor_config.json``;
e.g. 112 px -> 8x8 = 64 patch tokens, 224 px -> 16x16 = 256). When the stored position
embeddings are for another grid they are resampled (bicubic) to that grid once, at load
time, so ``Dinov2Model`` never interpolates in ``forward``.

Feature selection follows LLaVA: ``mm_vision_select_layer`` indexes ``hidden_states``
(-2: the penultimate block's output, before the final LayerNorm) and
``mm_vision_select_feature`` is ``'patch'`` (drop the CLS token) or ``'cls_patch'``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from basic_plugin.api import hookimpl

MODEL_TYPE = "dinov2"


def is_dinov2_folder(name: Any) -> bool:
    """True when ``name`` is a folder whose ``config.json`` has ``model_type`` "dinov2"."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def resample_position_embeddings(position_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + n*n, D)`` -> ``(1, 1 + grid*grid, D)``: the patch grid resampled bicubically.

    Half-pixel centres with the output size given (like ``F.interpolate(size=...)`` and the
    ONNX export's ``Resize``); the class position is kept.
    """
    cls_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    n = math.isqrt(patch_pos.shape[1])
    if n * n != patch_pos.shape[1]:
        raise ValueError(f"{patch_pos.shape[1]} position embeddings are not a square grid")
    if n == grid:
        return position_embeddings
    dtype = patch_pos.dtype
    x = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(dtype)
    return torch.cat([cls_pos, x], dim=1)


class DinoV2VisionTower(nn.Module):
    """LLaVA vision tower around ``transformers.Dinov2Model`` (frozen, like LLaVA's CLIP tower)."""

    def __init__(self, vision_tower, args, delay_load: bool = False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = str(vision_tower)
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        # Small JSON reads: the processor and the target resolution are known before the weights.
        self.image_processor = self._load_image_processor()
        self.image_size = self._target_image_size()
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = self._target_config()

    # -- configuration -------------------------------------------------------------------
    def _load_image_processor(self):
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(self.vision_tower_name)

    def _stored_config(self):
        from transformers import Dinov2Config

        return Dinov2Config.from_pretrained(self.vision_tower_name)

    def _target_image_size(self) -> int:
        crop = getattr(self.image_processor, "crop_size", None) or {}
        if isinstance(crop, Mapping) and "height" in crop:
            height, width = int(crop["height"]), int(crop["width"])
        elif isinstance(crop, int):
            height = width = crop
        else:
            height = width = int(self._stored_config().image_size)
        patch = int(self._stored_config().patch_size)
        if height != width:
            raise ValueError(f"{self.vision_tower_name}: LLaVA needs a square crop, got {height}x{width}")
        if height % patch:
            raise ValueError(f"{self.vision_tower_name}: crop size {height} is not a multiple of the patch size {patch}")
        return height

    def _target_config(self):
        config = self._stored_config()
        config.image_size = self.image_size
        return config

    # -- loading -------------------------------------------------------------------------
    def _weights_file(self) -> Optional[Path]:
        for name in ("model.safetensors", "pytorch_model.bin"):
            path = Path(self.vision_tower_name) / name
            if path.is_file():
                return path
        return None

    def load_model(self, device_map=None):
        if self.is_loaded:
            print(f"{self.vision_tower_name} is already loaded, `load_model` called again, skipping.")
            return
        from transformers import Dinov2Model

        stored = self._stored_config()
        target = self._target_config()
        kwargs = {} if device_map is None else {"device_map": device_map}
        stored_grid = int(stored.image_size) // int(stored.patch_size)
        grid = self.image_size // int(stored.patch_size)
        if stored_grid == grid:
            model = Dinov2Model.from_pretrained(self.vision_tower_name, **kwargs)
        else:
            # Resample in the state dict, then build at the target size: the parameter has
            # its final shape from the start (safe under ZeRO-3 partitioning as well).
            path = self._weights_file()
            if path is None:
                raise FileNotFoundError(f"{self.vision_tower_name} has no model.safetensors / pytorch_model.bin")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            key = next(k for k in state if k.endswith("embeddings.position_embeddings"))
            state[key] = resample_position_embeddings(state[key], grid)
            model = Dinov2Model.from_pretrained(self.vision_tower_name, config=target, state_dict=state, **kwargs)
        model.config.image_size = self.image_size
        model.requires_grad_(False)
        self.vision_tower = model
        self.is_loaded = True

    # -- features ------------------------------------------------------------------------
    def feature_select(self, image_forward_outs):
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        elif self.select_feature == "cls_patch":
            pass
        else:
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        return image_features

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        outs = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(outs).to(images.dtype)

    @torch.no_grad()
    def forward(self, images):
        if isinstance(images, list):
            return [self._encode(image.unsqueeze(0)) for image in images]
        return self._encode(images)

    # -- properties LLaVA reads ----------------------------------------------------------
    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches_per_side(self):
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self):
        return self.num_patches_per_side ** 2


@hookimpl
def llava_build_vision_tower(vision_tower_cfg, kwargs):
    """Build a ``DinoV2VisionTower`` for a DINOv2 folder; None (LLaVA's CLIP default) otherwise."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not is_dinov2_folder(name):
        return None
    return DinoV2VisionTower(name, args=vision_tower_cfg, **dict(kwargs or {}))

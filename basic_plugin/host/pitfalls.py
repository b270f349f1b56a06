"""LLaVA settings that fail late or finish without what they were for, refused while ``train()`` parses.

Each rule is a trap LLaVA users report, checked from the flags and the checkpoint's
``config.json`` alone (nothing is loaded):

- ZeRO-3 with ``--pretrain_mm_mlp_adapter`` on a LLaVA checkpoint: the checkpoint builds its
  own projector while it loads, inside ZeRO-3's partitioning, and LLaVA's load of the adapter
  then fails on a ``torch.Size([0])`` partition (LLaVA issues #1554, #728);
- LoRA with ``--freeze_mm_mlp_adapter True`` from a base LLM: LLaVA saves a LoRA run's
  non-LoRA weights only when they train (``non_lora_trainables.bin``), so the output holds
  no projector and ``load_pretrained_model`` builds a new random one (#784, #1373).
"""
from __future__ import annotations

import json
import os

from basic_plugin.host.refusal import Refusal

#: keys LLaVA writes into the config.json of a checkpoint that holds a projector
LLAVA_CHECKPOINT_KEYS = ("mm_projector_type", "mm_vision_tower")


def deepspeed_stage(deepspeed) -> int | None:
    """The ZeRO stage of ``--deepspeed`` (a JSON path or a dict), or None when there is none or it cannot be read."""
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        try:
            with open(deepspeed, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    return stage if isinstance(stage, int) else None


def model_config(model_args, training_args) -> dict:
    """``--model_name_or_path``'s config.json as a dict (local folder or the Hugging Face cache), {} when unreadable."""
    path = getattr(model_args, "model_name_or_path", None)
    if not path:
        return {}
    try:
        import transformers

        return transformers.PretrainedConfig.get_config_dict(
            path, cache_dir=getattr(training_args, "cache_dir", None))[0]
    except Exception:  # noqa: BLE001 - an unreadable config only leaves these checks out
        return {}


def is_llava_checkpoint(config: dict) -> bool:
    """A checkpoint LLaVA saved with its vision modules (it builds a projector while it loads)."""
    return any(config.get(key) for key in LLAVA_CHECKPOINT_KEYS)


def check_llava_pitfalls(model_args, training_args) -> None:
    """Refuse the settings above (:class:`Refusal`, naming the flags and what is allowed)."""
    if model_args is None:
        return
    adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
    lora_frozen = getattr(training_args, "lora_enable", False) and getattr(training_args, "freeze_mm_mlp_adapter", False)
    stage = deepspeed_stage(getattr(training_args, "deepspeed", None)) if adapter else None
    if stage != 3 and not lora_frozen:
        return
    config = model_config(model_args, training_args)
    model = model_args.model_name_or_path
    if stage == 3 and is_llava_checkpoint(config):
        raise Refusal(
            f"--pretrain_mm_mlp_adapter {adapter} under ZeRO-3 (--deepspeed {training_args.deepspeed}): "
            f"--model_name_or_path {model} is a LLaVA checkpoint, which builds its own projector while it loads, "
            "partitioned by ZeRO-3, so LLaVA's load of the adapter fails (size mismatch ... torch.Size([0])); "
            "allowed: drop --pretrain_mm_mlp_adapter (the checkpoint has a projector), start from the base LLM "
            "(e.g. lmsys/vicuna-7b-v1.5, as LLaVA's finetune.sh does), or a ZeRO-2 config")
    if lora_frozen and not is_llava_checkpoint(config):
        raise Refusal(
            f"--freeze_mm_mlp_adapter True with --lora_enable True on the base LLM {model}: LLaVA saves a LoRA "
            "run's non-LoRA weights only when they train (non_lora_trainables.bin), so the output would hold no "
            "projector and load_pretrained_model(..., model_base) would build a new, random one; allowed: drop "
            "--freeze_mm_mlp_adapter (LLaVA's finetune_lora.sh trains the projector, at --mm_projector_lr), or "
            "start from a LLaVA checkpoint whose projector the merged model keeps")

"""LLaVA-1.5's training arguments: one builder for the GPU recipes, the CPU demo and the tiny model.

The values are those of LLaVA's ``scripts/v1_5/pretrain.sh``, ``finetune.sh`` and
``finetune_lora.sh`` (LLaVA c121f04). :func:`llava15_args` returns them as an argument list for
``train()`` with a run's paths and overrides; :func:`cpu_args` is the CPU variant used by the
demo and the tests (fp32, no tf32, no reporting, no workers, no checkpoints, ``--max_steps``).

Where a flag goes in the list changes nothing in ``train()`` (HfArgumentParser keeps the last
value of a repeated flag), but the lists are compared as written: the demo reuses a finished
run only when its stored list is equal, and the recipes print theirs with ``--dry-run``. The
order is therefore a parameter: LLaVA's own scripts' by default, :data:`CPU_ORDER` for the CPU
runs, the recipes' in ``scripts/recipes/llava15_basic.py``.

Standard library only: the recipes load this file by path under any ``python3``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: The shipped DeepSpeed configs (LLaVA's scripts/zero2.json and zero3.json).
DEEPSPEED_CONFIGS: Dict[str, Path] = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}

STAGES = ("pretrain", "finetune", "lora")

_COMMON = {
    "--mm_projector_type": "mlp2x_gelu",
    "--mm_vision_select_layer": "-2",
    "--mm_use_im_start_end": "False",
    "--mm_use_im_patch_token": "False",
    "--bf16": "True",
    "--num_train_epochs": "1",
    "--per_device_eval_batch_size": "4",
    "--gradient_accumulation_steps": "1",
    "--evaluation_strategy": "no",
    "--save_strategy": "steps",
    "--save_total_limit": "1",
    "--weight_decay": "0.",
    "--warmup_ratio": "0.03",
    "--lr_scheduler_type": "cosine",
    "--logging_steps": "1",
    "--tf32": "True",
    "--model_max_length": "2048",
    "--gradient_checkpointing": "True",
    "--dataloader_num_workers": "4",
    "--lazy_preprocess": "True",
    "--report_to": "wandb",
}
_INSTRUCT = {"--version": "v1", "--image_aspect_ratio": "pad", "--group_by_modality_length": "True",
             "--per_device_train_batch_size": "16", "--save_steps": "50000"}

#: Hyperparameters of each stage's script (8 GPUs: the per-device batch x 8 is the global batch).
LLAVA15: Dict[str, Dict[str, str]] = {
    "pretrain": {**_COMMON, "--version": "plain", "--tune_mm_mlp_adapter": "True",
                 "--per_device_train_batch_size": "32", "--save_steps": "24000", "--learning_rate": "1e-3"},
    "finetune": {**_COMMON, **_INSTRUCT, "--learning_rate": "2e-5"},
    "lora": {**_COMMON, **_INSTRUCT, "--learning_rate": "2e-4", "--lora_enable": "True", "--lora_r": "128",
             "--lora_alpha": "256", "--mm_projector_lr": "2e-5"},
}

#: The flags' order in LLaVA's scripts (finetune_lora.sh opens with its four LoRA flags).
SCRIPT_ORDER = (
    "--lora_enable", "--lora_r", "--lora_alpha", "--mm_projector_lr",
    "--deepspeed", "--model_name_or_path", "--version", "--data_path", "--image_folder", "--vision_tower",
    "--pretrain_mm_mlp_adapter", "--mm_projector_type", "--tune_mm_mlp_adapter", "--mm_vision_select_layer",
    "--mm_use_im_start_end", "--mm_use_im_patch_token", "--image_aspect_ratio", "--group_by_modality_length",
    "--bf16", "--output_dir", "--num_train_epochs", "--per_device_train_batch_size",
    "--per_device_eval_batch_size", "--gradient_accumulation_steps", "--evaluation_strategy", "--save_strategy",
    "--save_steps", "--save_total_limit", "--learning_rate", "--weight_decay", "--warmup_ratio",
    "--lr_scheduler_type", "--logging_steps", "--tf32", "--model_max_length", "--gradient_checkpointing",
    "--dataloader_num_workers", "--lazy_preprocess", "--report_to",
)

#: The order of :func:`cpu_args` (that of the lists the demo has stored with its runs).
CPU_ORDER = (
    "--model_name_or_path", "--data_path", "--image_folder", "--vision_tower", "--mm_projector_type",
    "--mm_vision_select_layer", "--mm_use_im_start_end", "--mm_use_im_patch_token", "--output_dir",
    "--num_train_epochs", "--max_steps", "--per_device_train_batch_size", "--per_device_eval_batch_size",
    "--gradient_accumulation_steps", "--save_strategy", "--weight_decay", "--warmup_ratio", "--lr_scheduler_type",
    "--logging_steps", "--model_max_length", "--gradient_checkpointing", "--lazy_preprocess", "--tf32", "--bf16",
    "--report_to", "--dataloader_num_workers", "--seed", "--version", "--tune_mm_mlp_adapter",
    "--image_aspect_ratio", "--group_by_modality_length", "--learning_rate", "--pretrain_mm_mlp_adapter",
    "--lora_enable", "--lora_r", "--lora_alpha", "--mm_projector_lr", "--deepspeed",
)


def deepspeed_config(config: PathLike) -> str:
    """A DeepSpeed config path; ``"zero2"``/``"zero3"`` name the shipped ones."""
    name = str(config)
    return str(DEEPSPEED_CONFIGS[name]) if name in DEEPSPEED_CONFIGS else name


def llava15_args(stage: str, *, model: PathLike, data_path: PathLike, image_folder: PathLike,
                 vision_tower: PathLike, output_dir: PathLike, deepspeed: Optional[PathLike] = None,
                 pretrain_mm_mlp_adapter: Optional[PathLike] = None,
                 overrides: Optional[Mapping[str, object]] = None, order: Sequence[str] = SCRIPT_ORDER,
                 extra: Iterable[str] = ()) -> List[str]:
    """LLaVA-1.5's arguments for ``train()`` at ``stage`` (``pretrain``, ``finetune`` or ``lora``).

    ``deepspeed``: a config path or ``"zero2"``/``"zero3"`` (None: no DeepSpeed).
    ``overrides``: ``{"--flag": value}`` replacing the scripts' values or adding flags; a value
    of None drops the flag. Values are written with ``str()``.
    ``order``: the flags named here come first, in this order; any others follow in the order
    they were added. ``extra`` is appended last, as given.
    """
    if stage not in LLAVA15:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    values: Dict[str, object] = {
        "--model_name_or_path": model, "--data_path": data_path, "--image_folder": image_folder,
        "--vision_tower": vision_tower, "--output_dir": output_dir,
        "--deepspeed": None if deepspeed is None else deepspeed_config(deepspeed),
        "--pretrain_mm_mlp_adapter": pretrain_mm_mlp_adapter,
        **LLAVA15[stage],
    }
    values.update(overrides or {})
    present = {flag: value for flag, value in values.items() if value is not None}
    rank = {flag: i for i, flag in enumerate(order)}
    ordered = sorted(present, key=lambda flag: rank.get(flag, len(rank)))  # stable: the others keep their order
    args: List[str] = []
    for flag in ordered:
        args += [flag, str(present[flag])]
    return args + [str(a) for a in extra]


def cpu_args(*, model: PathLike, vision_tower: PathLike, data_path: PathLike, image_folder: PathLike,
             output_dir: PathLike, stage: str = "pretrain", max_steps: int = 4, batch: int = 2, lora: bool = False,
             deepspeed: Optional[PathLike] = None, gradient_checkpointing: bool = True,
             pretrain_mm_mlp_adapter: Optional[PathLike] = None, mm_projector_lr: Optional[float] = None,
             model_max_length: int = 512, extra: Iterable[str] = ()) -> List[str]:
    """:func:`llava15_args` for a CPU run of ``stage`` (``pretrain`` or ``finetune``), in :data:`CPU_ORDER`.

    Changed from the scripts: ``--max_steps`` with ``batch`` per device (train and eval), no
    checkpoints, fp32 without tf32, no reporting, no data workers, ``--seed 0``, the given
    ``--model_max_length`` and ``--gradient_checkpointing``. ``lora=True``: LoRA r 8, alpha 16
    (with ``finetune``, at ``finetune_lora.sh``'s learning rate).

    ``mm_projector_lr`` (``finetune_lora.sh`` passes 2e-5) is off by default: with LoRA it
    makes one of LLaVATrainer's four parameter groups empty, DeepSpeed drops empty groups
    from the optimizer after the LR scheduler was built, and torch 2.13's scheduler (strict
    ``zip``) then fails at the first step (``zip() argument 2 is longer than argument 1``).
    (Older torch zipped silently: the projector weights got the LoRA learning rate.)
    """
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', not {stage!r}")
    overrides: Dict[str, object] = {
        "--max_steps": max_steps, "--per_device_train_batch_size": batch, "--per_device_eval_batch_size": batch,
        "--evaluation_strategy": None, "--save_strategy": "no", "--save_steps": None, "--save_total_limit": None,
        "--model_max_length": model_max_length, "--gradient_checkpointing": bool(gradient_checkpointing),
        "--tf32": False, "--bf16": False, "--report_to": "none", "--dataloader_num_workers": 0, "--seed": 0,
        "--mm_projector_lr": mm_projector_lr,
    }
    if lora:
        overrides.update({"--lora_enable": True, "--lora_r": 8, "--lora_alpha": 16})
    return llava15_args("lora" if lora and stage == "finetune" else stage, model=model, data_path=data_path,
                        image_folder=image_folder, vision_tower=vision_tower, output_dir=output_dir,
                        deepspeed=deepspeed, pretrain_mm_mlp_adapter=pretrain_mm_mlp_adapter,
                        overrides=overrides, order=CPU_ORDER, extra=extra)

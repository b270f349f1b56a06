"""BASIC's flags, added to LLaVA's ``train()`` by the plugin host.

:class:`BasicArguments` is the one place BASIC's defaults are written: the resolved settings
(:class:`basic_plugin.basic.objective.BasicSettings`), the guard and the loss functions'
keyword defaults read them from here (:func:`flag_default`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

VOCAB_CHOICES = ("embed", "lm_head")
WEIGHT_CHOICES = ("raw", "sum1", "uniform")
KL_CHOICES = ("forward", "reverse")
GUARD_CHOICES = ("warn", "stop", "off")
#: every BASIC flag is ``basic_<name>``; a setting keeps ``<name>``
FLAG_PREFIX = "basic_"


@dataclass
class BasicArguments:
    #: the flag that turns BASIC on; the host refuses the other basic_* flags while it is off
    switch: ClassVar[str] = "basic"

    basic: bool = field(default=False, metadata={"help": "Enable BASIC's visual supervision of the projector."})
    basic_depth: Optional[int] = field(default=None, metadata={
        "help": "Supervision depth k: target = l^2-weighted mean of layers 1..k, k < the LLM's layer count "
                "(default: half the LLM's layers)."})
    basic_lambda_das: float = field(default=1.0, metadata={"help": "Weight of the direction loss L_das."})
    basic_lambda_sds: float = field(default=0.01, metadata={"help": "Weight of the distribution loss L_sds."})
    basic_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of L_sds."})
    basic_vocab: str = field(default="embed", metadata={
        "help": "Vocabulary matrix E of L_sds: input embeddings (paper's analysis) or lm_head.",
        "choices": list(VOCAB_CHOICES)})
    basic_detach_vocab: bool = field(default=False, metadata={
        "help": "Never send L_sds gradient into E (it does by default when E is trainable)."})
    basic_patch_weights: str = field(default="raw", metadata={
        "help": "Per-patch weights a_i: raw text->image attention (paper), normalised to sum 1, or uniform.",
        "choices": list(WEIGHT_CHOICES)})
    basic_kl: str = field(default="forward", metadata={
        "help": "KL direction of L_sds: forward KL(P||Q) (default) or reverse KL(Q||P).",
        "choices": list(KL_CHOICES)})
    basic_sds_chunk_size: int = field(default=256, metadata={
        "help": "Image-token rows per chunk of the full-vocabulary KL (memory: chunk x vocab fp32)."})
    basic_query_chunk: int = field(default=256, metadata={
        "help": "Text query rows per chunk when recomputing patch weights."})
    basic_drop_channels: str = field(default="0", metadata={
        "help": "Leave the LLM's massive-activation channels out of both terms: 0 (the paper: none), auto "
                "(channels whose mean |h| over a fixed text probe at layers 1..k is >= 10x the median channel's, "
                "found before training and logged), or N (the N largest by that statistic)."})
    basic_standardize_target: bool = field(default=False, metadata={
        "help": "Standardise each channel of the refined target over the micro-batch's image tokens (zero mean, "
                "unit variance) before both terms, so no channel leads the direction by its scale alone."})
    basic_pretrain: bool = field(default=True, metadata={
        "help": "Apply BASIC in projector pretraining (--tune_mm_mlp_adapter True)."})
    basic_finetune: bool = field(default=True, metadata={
        "help": "Apply BASIC in instruction tuning (projector + LLM trainable)."})
    basic_guard: str = field(default="warn", metadata={
        "help": "When image tokens collapse or BASIC's terms out-weigh the caption loss over a window of logging "
                "steps: warn (one line in the log), stop (checkpoint and end the run), or off.",
        "choices": list(GUARD_CHOICES)})
    basic_guard_window: int = field(default=5, metadata={"help": "Logging steps the guard averages over."})
    basic_guard_collapse: float = field(default=0.9, metadata={
        "help": "Guard threshold on the mean pairwise cosine of an image's projector tokens."})
    basic_guard_share: float = field(default=0.75, metadata={
        "help": "Guard threshold on BASIC's share of the loss, (das + sds) / total (0.75: the terms weigh 3x the "
                "caption loss)."})


def flag_default(flag: str):
    """The default of BASIC's flag ``--<flag>`` (e.g. ``flag_default("basic_lambda_sds")``)."""
    return BasicArguments.__dataclass_fields__[flag].default


def validate_basic_arguments(args) -> None:
    """Refuse invalid BASIC settings with a message that names the flag."""
    def bad(flag, value, allowed):
        raise ValueError(f"--{flag} {value!r} is invalid; allowed: {allowed}")

    if args.basic_depth is not None and args.basic_depth < 1:
        bad("basic_depth", args.basic_depth, "an integer >= 1 and < the LLM's layer count")
    for flag in ("basic_lambda_das", "basic_lambda_sds"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            bad(flag, value, "a finite number >= 0")
    if not (math.isfinite(args.basic_temperature) and args.basic_temperature > 0):
        bad("basic_temperature", args.basic_temperature, "a finite number > 0")
    for flag, choices in (("basic_vocab", VOCAB_CHOICES), ("basic_patch_weights", WEIGHT_CHOICES),
                          ("basic_kl", KL_CHOICES), ("basic_guard", GUARD_CHOICES)):
        if getattr(args, flag) not in choices:
            bad(flag, getattr(args, flag), "|".join(choices))
    spec = str(args.basic_drop_channels).strip()
    if spec != "auto" and not (spec.isdigit() and spec.isascii()):
        bad("basic_drop_channels", args.basic_drop_channels, "0 (none), auto, or an integer N >= 0")
    if args.basic_guard_window < 1:
        bad("basic_guard_window", args.basic_guard_window, "an integer >= 1")
    for flag in ("basic_guard_collapse", "basic_guard_share"):
        if not 0 < getattr(args, flag) <= 1:
            bad(flag, getattr(args, flag), "a number in (0, 1]")
    for flag in ("basic_sds_chunk_size", "basic_query_chunk"):
        if getattr(args, flag) < 1:
            bad(flag, getattr(args, flag), "an integer >= 1")

"""GPU check: BASIC's cost on a LLaVA-1.5-7B-shaped model, and a_i against eager attention.

``python -m basic_plugin.lab.gpu_check`` (or ``bash scripts/gpu_check.sh`` on a machine with
torch but no internet) builds a randomly initialised LLaVA-1.5-7B-shaped model (Vicuna-7B:
d 4096, 32 layers, 32 heads, FFN 11008, vocabulary 32000; CLIP ViT-L/14 at 336 px: 24
layers, d 1024, 576 patches; projector ``mlp2x_gelu``) in bfloat16, and for each attention
implementation (SDPA, and FlashAttention-2 when ``flash_attn`` imports) and each stage
measures one training step with BASIC off and on at per-device batch 16:

- ``pretrain``: only the projector trainable, LLaVA-1.5 pretraining tokens (bos, image,
  40 caption tokens), AdamW on the projector;
- ``finetune``: the whole LLM and the projector trainable, LLaVA-1.5 instruction tokens
  (35 before the image, 565 after), AdamW (fused on CUDA; plain bfloat16 states: parameters,
  gradients and two moments are 4 x 13.5 GB). If the optimizer step does not fit, the stage
  is measured as forward + backward without the step, and the run says so.

Both stages use gradient checkpointing, as LLaVA-1.5's ``pretrain.sh``/``finetune.sh`` do
(``use_reentrant=True``, transformers 4.37's behaviour). "Off" binds no objective (LLaVA's
own forward), "on" binds BASIC's objective with default flags (what ``--basic True`` gives),
exactly as :mod:`basic_plugin.lab.bench.step` does; rounds alternate which goes first;
one warm-up round, then ``--repeats`` timed rounds (medians). Peak memory is
``torch.cuda.max_memory_allocated`` over each mode's timed steps.

The a_i check builds a smaller model of the same kind in float32 (Vicuna-7B's width and
heads, 4 layers, depth 2; the CLIP-L/336 tower; two samples with finetuning tokens, one
right-padded), recomputes a_i from the SDPA model's hidden states with
:func:`basic_plugin.basic.patch_weights.image_attention_mass`, and compares it with the
mean attention probabilities of the eager model (same weights, same inputs), averaged
in float64.

Thresholds (``PASS``/``MISS``), see docs/PERFORMANCE.md:

- step overhead ``on/off - 1 <= 1.5 x BASIC's analytical FLOP share + 0.02`` (the FLOP
  share of :mod:`basic_plugin.lab.bench.flops` for the same shapes; 0.02 allows for the
  timing noise of three rounds and for launch overhead the FLOP count does not see);
- peak memory ``on <= 1.10 x off``;
- a_i: ``max |a - a_ref| <= 1e-4 x max a_ref`` (float32 against float64);
- every loss finite and BASIC's terms present in each "on" step.

Timing and memory are judged on CUDA at the full shape only (``n/a`` with ``--tiny`` or on
CPU); a_i and finiteness are always judged. The exit status is 1 when a_i or finiteness
fails, else 0 (a timing ``MISS`` is a finding, not an error).

``--tiny`` runs the same code with tiny shapes (CPU, seconds). Output: a table, then one
JSON summary (also written to ``--json PATH``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from basic_plugin.host.binding import bind, binding_of
from basic_plugin.host.refusal import print_refusal
from basic_plugin.lab.bench.flops import (CLIP_L_336, FINETUNE_TEXT, PRETRAIN_TEXT, VICUNA_7B, LLMShape, Workload,
                                          flop_share, llm_shape_of, tower_shape_of)
from basic_plugin.lab.bench.machine import machine_info, sync
from basic_plugin.lab.bench.step import make_step_batch, prepare_stage

__all__ = ["CheckShape", "FULL", "TINY", "THRESHOLDS", "build_llava", "measure_stage", "check_patch_weights",
           "flash_attention_status", "reference_attention_mass", "run_check", "main", "SUMMARY_FIELDS", "RUN_FIELDS",
           "PATCH_FIELDS"]

#: PASS/MISS thresholds (documented in the module docstring and docs/PERFORMANCE.md).
THRESHOLDS = {
    "overhead_factor": 1.5,  # overhead <= factor * flop_share + slack
    "overhead_slack": 0.02,
    "memory_ratio": 1.10,  # peak_on <= ratio * peak_off
    "a_i_rel_error": 1e-4,  # max |a - a_ref| <= this * max a_ref
}


@dataclass
class TowerSpec:
    hidden: int
    layers: int
    heads: int
    ffn: int
    image_size: int
    patch: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass
class CheckShape:
    """Everything that differs between the full check and ``--tiny``."""

    name: str
    llm: LLMShape
    tower: TowerSpec
    batch: int
    text: Dict[str, Tuple[int, int]]  # stage -> (tokens before the image incl. bos, after)
    ai_llm: LLMShape  # the a_i check's smaller LLM
    ai_depth: int
    ai_batch: int
    ai_pad: int  # trailing tokens of the last sample that are padding
    max_length: int = 2048


CLIP_L_336_SPEC = TowerSpec(CLIP_L_336.hidden, CLIP_L_336.layers, 16, CLIP_L_336.ffn, 336, 14)
assert CLIP_L_336_SPEC.patches + 1 == CLIP_L_336.tokens

FULL = CheckShape(
    name="llava-1.5-7b", llm=VICUNA_7B, tower=CLIP_L_336_SPEC, batch=16,
    text={"pretrain": PRETRAIN_TEXT, "finetune": FINETUNE_TEXT},
    ai_llm=LLMShape("Vicuna-7B width, 4 layers", 4096, 4, 32, 32, 11008, 32000), ai_depth=2, ai_batch=2, ai_pad=7)

TINY = CheckShape(
    name="tiny", llm=LLMShape("tiny", 64, 4, 4, 4, 172, 1000), tower=TowerSpec(32, 3, 2, 64, 56, 14), batch=2,
    text={"pretrain": (1, 8), "finetune": (6, 20)},
    ai_llm=LLMShape("tiny", 64, 4, 4, 4, 172, 1000), ai_depth=2, ai_batch=2, ai_pad=3, max_length=256)

STAGES = ("pretrain", "finetune")

#: Fields of the JSON summary, of each row of ``runs``, and of ``patch_weights`` (the test checks them).
SUMMARY_FIELDS = ("check", "shape", "device", "dtype", "machine", "batch", "warmup", "repeats", "thresholds",
                  "attention", "flash_attention", "runs", "patch_weights", "skipped", "notes", "elapsed_s", "pass")
RUN_FIELDS = ("attention", "stage", "trainable", "gradient_checkpointing", "optimizer", "batch", "tokens",
              "image_tokens", "depth", "step_off_s", "step_on_s", "ratio", "overhead", "times_off", "times_on",
              "peak_off_bytes", "peak_on_bytes", "peak_off_gib", "peak_on_gib", "memory_ratio", "flop_share",
              "overhead_limit", "loss_off", "loss_on", "basic_terms_present", "finite", "verdict", "note")
PATCH_FIELDS = ("shape", "layers", "depth", "batch", "tokens", "rows", "max_abs_diff", "max_rel_diff", "max_a",
                "mean_a", "dtype", "attention", "verdict")


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the model


def build_llava(llm: LLMShape, tower: TowerSpec, *, attention: str, dtype: torch.dtype, device: torch.device,
                workdir: str, max_length: int = 2048, seed: int = 0):
    """A random LLaVA-1.5 model of these shapes, built on ``device`` in ``dtype``.

    LLaVA's own classes (with the plugin host's forward), its ``CLIPVisionTower`` and
    ``initialize_vision_modules`` (projector ``mlp2x_gelu``, select layer -2, patch features):
    only the tower's weights are created here (random, on the device) instead of being read
    from a checkpoint, so that nothing but a config file is written.
    """
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from basic_plugin.host.forward import with_plugin_forward

    cls = with_plugin_forward(LlavaLlamaForCausalLM)
    config = LlavaConfig(vocab_size=llm.vocab, hidden_size=llm.hidden, intermediate_size=llm.ffn,
                         num_hidden_layers=llm.layers, num_attention_heads=llm.heads,
                         num_key_value_heads=llm.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, torch_dtype=dtype, attn_implementation=attention)

    vision_config = CLIPVisionConfig(hidden_size=tower.hidden, intermediate_size=tower.ffn,
                                     num_hidden_layers=tower.layers, num_attention_heads=tower.heads,
                                     image_size=tower.image_size, patch_size=tower.patch)
    vision_dir = os.path.join(workdir, f"clip-{tower.hidden}-{tower.layers}-{tower.image_size}")
    vision_config.save_pretrained(vision_dir)
    margs = types.SimpleNamespace(
        vision_tower=vision_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat")
    vision = CLIPVisionTower(vision_dir, margs, delay_load=True)
    torch.manual_seed(seed + 1)
    with torch.device(device):
        vision.vision_tower = CLIPVisionModel._from_config(vision_config, torch_dtype=dtype)
    vision.vision_tower.requires_grad_(False)
    vision.is_loaded = True
    model.get_model().vision_tower = vision
    torch.manual_seed(seed + 2)
    with torch.device(device), contextlib.redirect_stdout(io.StringIO()):  # "already loaded, skipping"
        model.get_model().initialize_vision_modules(model_args=margs)
    model.to(device=device, dtype=dtype)
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = max_length
    return model


def flash_attention_status(device: torch.device) -> Dict[str, object]:
    """Whether FlashAttention-2 can be used here, and why not."""
    if device.type != "cuda":
        return {"available": False, "why": "FlashAttention-2 needs CUDA"}
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable
        return {"available": False, "why": f"flash_attn does not import ({type(exc).__name__}: {exc})"}
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return {"available": False, "why": "transformers does not accept this flash_attn version",
                "version": getattr(flash_attn, "__version__", None)}
    return {"available": True, "why": None, "version": getattr(flash_attn, "__version__", None)}


# --------------------------------------------------------------------------- timing


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _step(model, optimizer, batch, device) -> Tuple[float, Optional[int], float]:
    """(seconds, peak bytes or None, loss) of forward + backward (+ optimizer step) + zero_grad.

    The gradients are dropped at the end of the step, as the trainer does, so that the peak
    is that of a training step (parameters, optimizer states, activations, new gradients).
    """
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return elapsed, peak, float(out.loss.detach())


def _rounds(model, objective, optimizer, batch, device, warmup: int, repeats: int):
    times: Dict[str, List[float]] = {"off": [], "on": []}
    peaks: Dict[str, List[int]] = {"off": [], "on": []}
    losses: Dict[str, List[float]] = {"off": [], "on": []}
    terms_ok = True
    for r in range(warmup + repeats):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):  # alternate who goes first
            bind(model, [objective] if mode == "on" else [])
            elapsed, peak, loss = _step(model, optimizer, batch, device)
            losses[mode].append(loss)
            if mode == "on":
                record = binding_of(model).last_step
                terms_ok = terms_ok and record.skipped is None and {"basic_das", "basic_sds"} <= set(record.terms)
            if r >= warmup:
                times[mode].append(elapsed)
                if peak is not None:
                    peaks[mode].append(peak)
    bind(model, [])
    return times, peaks, losses, terms_ok


def measure_stage(model, stage: str, shape: CheckShape, *, attention: str, dtype: torch.dtype,
                  device: torch.device, warmup: int, repeats: int, judge: bool) -> Dict[str, object]:
    """One row: step time and peak memory with BASIC off and on for ``stage`` (see the module doc)."""
    objective, params = prepare_stage(model, stage)
    settings = objective.settings
    before, after = shape.text[stage]
    batch = make_step_batch(model, shape.batch, before, after, device=device)
    batch["images"] = batch["images"].to(dtype)  # as the bf16 trainer hands them to the model
    note = ""
    optimizer_name = "adamw"
    optimizer = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    out_of_memory = False
    try:
        times, peaks, losses, terms_ok = _rounds(model, objective, optimizer, batch, device, warmup, repeats)
    except RuntimeError as exc:
        if not (device.type == "cuda" and _is_oom(exc)):
            raise
        out_of_memory = True  # retried below, once the traceback (and the tensors it holds) is gone
    optimizer = None
    model.zero_grad(set_to_none=True)
    if out_of_memory:
        bind(model, [])
        free_memory(device)
        optimizer_name = "none (forward+backward)"
        note = "AdamW states did not fit on the GPU: measured forward + backward without the optimizer step"
        log(f"{attention} {stage}: out of memory with AdamW; retrying without the optimizer step")
        times, peaks, losses, terms_ok = _rounds(model, objective, None, batch, device, warmup, repeats)
        model.zero_grad(set_to_none=True)

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    llm, tower = llm_shape_of(model), tower_shape_of(model)
    wl = Workload(stage, tower.tokens - 1, before, after, settings.depth, vision_hidden=tower.hidden,
                  vocab_grad=stage == "finetune" and not settings.detach_vocab, checkpointing=True,
                  patch_weights=settings.patch_weights)
    share = flop_share(llm, tower, wl)["share"]
    peak_off = max(peaks["off"]) if peaks["off"] else None
    peak_on = max(peaks["on"]) if peaks["on"] else None
    finite = all(math.isfinite(x) for mode in losses.values() for x in mode)
    limit = THRESHOLDS["overhead_factor"] * share + THRESHOLDS["overhead_slack"]
    overhead = on / off - 1.0
    memory_ratio = peak_on / peak_off if peak_off else None
    verdict = {
        "overhead": ("PASS" if overhead <= limit else "MISS") if judge else "n/a",
        "memory": ("PASS" if memory_ratio <= THRESHOLDS["memory_ratio"] else "MISS")
        if judge and memory_ratio is not None else "n/a",
        "finite": "PASS" if finite and terms_ok else "MISS",
    }
    return {"attention": attention, "stage": stage,
            "trainable": "projector" if stage == "pretrain" else "LLM + projector",
            "gradient_checkpointing": True, "optimizer": optimizer_name, "batch": shape.batch, "tokens": wl.tokens,
            "image_tokens": wl.image_tokens, "depth": settings.depth, "step_off_s": off, "step_on_s": on,
            "ratio": on / off, "overhead": overhead, "times_off": times["off"], "times_on": times["on"],
            "peak_off_bytes": peak_off, "peak_on_bytes": peak_on,
            "peak_off_gib": None if peak_off is None else peak_off / 2 ** 30,
            "peak_on_gib": None if peak_on is None else peak_on / 2 ** 30, "memory_ratio": memory_ratio,
            "flop_share": share, "overhead_limit": limit, "loss_off": losses["off"][-1], "loss_on": losses["on"][-1],
            "basic_terms_present": terms_ok, "finite": finite, "verdict": verdict, "note": note}


def _enable_checkpointing(model) -> None:
    """As LLaVA's train() does with --gradient_checkpointing True (transformers 4.37 default: reentrant)."""
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


# --------------------------------------------------------------------------- a_i


def reference_attention_mass(attentions: Sequence[torch.Tensor], valid: torch.Tensor, batch_index: torch.Tensor,
                             seq_index: torch.Tensor, block_end: torch.Tensor, depth: int) -> torch.Tensor:
    """a_i from the eager model's attention probabilities, averaged in float64.

    Mean over layers 1..depth, heads, and the valid non-image positions j after the row's
    image block, of ``attentions[l][b, h, j, i]``; 0 for a row without such positions.
    """
    seq_len = valid.shape[1]
    is_img = torch.zeros_like(valid)
    is_img[batch_index, seq_index] = True
    arange = torch.arange(seq_len, device=valid.device)
    out = torch.zeros(batch_index.numel(), dtype=torch.float64, device=valid.device)
    for b in torch.unique(batch_index).tolist():
        rows = torch.nonzero(batch_index == b).flatten()
        mean = sum(attentions[l][b].double().mean(0) for l in range(depth)) / depth  # (L, L): [query, key]
        queries = (valid[b] & ~is_img[b]).unsqueeze(1) & (arange.unsqueeze(1) > block_end[rows].unsqueeze(0))
        to_rows = mean[:, seq_index[rows]]  # (L, m_b)
        count = queries.sum(0)
        out[rows] = torch.where(count > 0, (to_rows * queries).sum(0) / count.clamp_min(1), torch.zeros_like(out[rows]))
    return out


@torch.no_grad()
def check_patch_weights(shape: CheckShape, device: torch.device, workdir: str) -> Dict[str, object]:
    """a_i recomputed from an SDPA model's hidden states vs the eager model's probabilities (float32)."""
    from basic_plugin.basic.patch_weights import image_attention_mass
    from basic_plugin.host.positions import image_token_positions

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    try:
        sdpa = build_llava(shape.ai_llm, shape.tower, attention="sdpa", dtype=torch.float32, device=device,
                           workdir=workdir, max_length=shape.max_length, seed=3)
        eager = build_llava(shape.ai_llm, shape.tower, attention="eager", dtype=torch.float32, device=device,
                            workdir=workdir, max_length=shape.max_length, seed=4)
        eager.load_state_dict(sdpa.state_dict())
        sdpa.eval()
        eager.eval()
        before, after = shape.text["finetune"]
        batch = make_step_batch(sdpa, shape.ai_batch, before, after, seed=5, device=device)
        ids, mask = batch["input_ids"], batch["attention_mask"].clone()
        mask[-1, ids.shape[1] - shape.ai_pad:] = False  # the last sample is right-padded
        ids = ids.masked_fill(~mask, 0)
        labels = batch["labels"].masked_fill(~mask, -100)
        features = sdpa.encode_images(batch["images"])
        _, position_ids, embeds_mask, _, embeds, _ = sdpa.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, labels, batch["images"])
        positions = image_token_positions(ids, mask, features.shape[1], max_length=shape.max_length,
                                          padding_side="right")
        hidden = sdpa.get_model()(inputs_embeds=embeds, attention_mask=embeds_mask, position_ids=position_ids,
                                  output_hidden_states=True, return_dict=True).hidden_states
        a = image_attention_mass(sdpa.get_model().layers, hidden, embeds_mask, positions.batch_index,
                                 positions.seq_index, positions.block_end, depth=shape.ai_depth,
                                 position_ids=position_ids).double()
        del hidden
        attentions = eager.get_model()(inputs_embeds=embeds, attention_mask=embeds_mask, position_ids=position_ids,
                                       output_attentions=True, return_dict=True).attentions
        ref = reference_attention_mass(attentions, embeds_mask.bool(), positions.batch_index, positions.seq_index,
                                       positions.block_end, shape.ai_depth)
        diff = (a - ref).abs().max().item()
        top = ref.abs().max().item()
        rel = diff / top if top > 0 else math.inf
        result = {"shape": shape.ai_llm.name, "layers": shape.ai_llm.layers, "depth": shape.ai_depth,
                  "batch": shape.ai_batch, "tokens": int(embeds_mask.shape[1]), "rows": int(positions.num_rows),
                  "max_abs_diff": diff, "max_rel_diff": rel, "max_a": top, "mean_a": ref.mean().item(),
                  "dtype": "float32", "attention": "sdpa hidden states vs eager probabilities",
                  "verdict": "PASS" if rel <= THRESHOLDS["a_i_rel_error"] and math.isfinite(diff) else "MISS"}
        del sdpa, eager, attentions
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        free_memory(device)


# --------------------------------------------------------------------------- the run


def run_check(*, tiny: bool, device: torch.device, attention: Sequence[str], stages: Sequence[str],
              warmup: int, repeats: int, budget_s: float, dtype: Optional[torch.dtype] = None,
              batch: Optional[int] = None, skip_patch_weights: bool = False) -> Dict[str, object]:
    start = time.perf_counter()
    shape = TINY if tiny else FULL
    if batch is not None:
        shape = CheckShape(**{**shape.__dict__, "batch": batch})
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    judge = device.type == "cuda" and not tiny
    flash = flash_attention_status(device)
    wanted = list(attention)
    if "auto" in wanted:
        wanted = ["sdpa"] + (["flash_attention_2"] if flash["available"] else [])
    skipped: List[str] = []
    notes: List[str] = []
    if "flash_attention_2" in wanted and not flash["available"]:
        wanted.remove("flash_attention_2")
        skipped.append(f"flash_attention_2: {flash['why']}")
    if not flash["available"] and "flash_attention_2" not in attention:
        notes.append(f"FlashAttention-2 not measured: {flash['why']}")
    if not judge:
        notes.append("timing and memory are not judged (n/a): " + ("tiny shapes" if tiny else "not on CUDA"))
    runs: List[Dict[str, object]] = []
    patch: Optional[Dict[str, object]] = None
    slowest = 0.0  # the longest part so far: a part is started only if that much time is left

    def time_left(part: str) -> bool:
        left = budget_s - (time.perf_counter() - start)
        if left < slowest:
            skipped.append(f"{part}: {left:.0f} s of the {budget_s:.0f} s budget left, the slowest part took "
                           f"{slowest:.0f} s")
            log(f"skipping {part} (time budget)")
            return False
        return True

    with tempfile.TemporaryDirectory(prefix="basic-gpu-check-") as workdir:
        if not skip_patch_weights:
            t0 = time.perf_counter()
            log(f"a_i check ({shape.ai_llm.name}, {shape.ai_llm.layers} layers, float32) on {device}")
            patch = check_patch_weights(shape, device, workdir)
            slowest = max(slowest, time.perf_counter() - t0)
            log(f"a_i: max abs diff {patch['max_abs_diff']:.3g}, relative {patch['max_rel_diff']:.3g}")
        for attn in wanted:
            t0 = time.perf_counter()
            if not time_left(f"{attn} model"):
                continue
            log(f"building {shape.llm.name} + CLIP {shape.tower.image_size}px, {attn}, {dtype} on {device}")
            model = build_llava(shape.llm, shape.tower, attention=attn, dtype=dtype, device=device, workdir=workdir,
                                max_length=shape.max_length)
            _enable_checkpointing(model)
            slowest = max(slowest, time.perf_counter() - t0)
            for stage in stages:
                t0 = time.perf_counter()
                if not time_left(f"{attn} {stage}"):
                    continue
                log(f"{attn} {stage}: batch {shape.batch}, warm-up {warmup}, timed {repeats}")
                row = None
                try:
                    row = measure_stage(model, stage, shape, attention=attn, dtype=dtype, device=device,
                                        warmup=warmup, repeats=repeats, judge=judge)
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                if row is None:  # out of memory even without the optimizer step
                    model.zero_grad(set_to_none=True)
                    bind(model, [])
                    skipped.append(f"{attn} {stage}: out of memory even without the optimizer step")
                    free_memory(device)
                    continue
                runs.append(row)
                if row["note"]:
                    notes.append(f"{attn} {stage}: {row['note']}")
                log(f"{attn} {stage}: off {row['step_off_s']:.3f} s, on {row['step_on_s']:.3f} s "
                    f"(x{row['ratio']:.3f}; FLOP share {row['flop_share']:.4f})")
                free_memory(device)
                slowest = max(slowest, time.perf_counter() - t0)
            del model
            free_memory(device)

    judged = [v for row in runs for v in row["verdict"].values()] + ([patch["verdict"]] if patch else [])
    return {"check": "basic-llava gpu_check", "shape": shape.name, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "machine": machine_info(device), "batch": shape.batch,
            "warmup": warmup, "repeats": repeats, "thresholds": dict(THRESHOLDS), "attention": wanted,
            "flash_attention": flash, "runs": runs, "patch_weights": patch, "skipped": skipped, "notes": notes,
            "elapsed_s": time.perf_counter() - start, "pass": bool(judged) and all(v != "MISS" for v in judged)}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(summary: Dict[str, object]) -> str:
    lines = [f"BASIC GPU check: {summary['shape']} on {summary['device']} ({summary['dtype']}), "
             f"batch {summary['batch']}, warm-up {summary['warmup']}, timed {summary['repeats']}",
             f"{'attention':<18} {'stage':<9} {'off s':>8} {'on s':>8} {'ratio':>6} {'FLOP share':>10} "
             f"{'limit':>6} {'peak off GiB':>12} {'peak on GiB':>11} {'mem':>5}  overhead memory finite  optimizer"]
    for r in summary["runs"]:
        v = r["verdict"]
        lines.append(f"{r['attention']:<18} {r['stage']:<9} {r['step_off_s']:>8.3f} {r['step_on_s']:>8.3f} "
                     f"{r['ratio']:>6.3f} {r['flop_share']:>10.4f} {1 + r['overhead_limit']:>6.3f} "
                     f"{_fmt(r['peak_off_gib'], '12.2f'):>12} {_fmt(r['peak_on_gib'], '11.2f'):>11} "
                     f"{_fmt(r['memory_ratio'], '5.3f'):>5}  {v['overhead']:<8} {v['memory']:<6} {v['finite']:<6} "
                     f" {r['optimizer']}")
    p = summary["patch_weights"]
    if p:
        lines.append(f"a_i ({p['shape']}, depth {p['depth']}, {p['rows']} rows, {p['dtype']}): max abs diff "
                     f"{p['max_abs_diff']:.3g}, relative {p['max_rel_diff']:.3g} (limit "
                     f"{summary['thresholds']['a_i_rel_error']:g})  {p['verdict']}")
    for s in summary["skipped"]:
        lines.append(f"skipped: {s}")
    for n in summary["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"{'PASS' if summary['pass'] else 'MISS'} in {summary['elapsed_s']:.1f} s")
    return "\n".join(lines)


def _failed_correctness(summary: Dict[str, object]) -> bool:
    patch = summary["patch_weights"]
    return (patch is not None and patch["verdict"] != "PASS") or any(
        r["verdict"]["finite"] != "PASS" for r in summary["runs"])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m basic_plugin.lab.gpu_check",
                                     description="BASIC on a LLaVA-1.5-7B-shaped model: step time and peak memory "
                                                 "on vs off, and a_i against eager attention.")
    parser.add_argument("--tiny", action="store_true", help="the same code with tiny shapes (CPU, seconds)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--attention", default="auto",
                        help="comma-separated: sdpa, flash_attention_2, or auto (sdpa + FA2 when flash_attn imports)")
    parser.add_argument("--stages", default="pretrain,finetune", help="comma-separated: pretrain, finetune")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default 16; 2 with --tiny)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="start no part that would end past this many seconds (default 400)")
    parser.add_argument("--skip-patch-weights", action="store_true", help="leave out the a_i check")
    parser.add_argument("--json", default=None, help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    args.attention = [a.strip() for a in args.attention.split(",") if a.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for a in args.attention:
        if a not in ("auto", "sdpa", "flash_attention_2", "eager"):
            parser.error(f"unknown attention {a!r}")
    for s in args.stages:
        if s not in STAGES:
            parser.error(f"unknown stage {s!r}")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and lose much on a loaded machine
    if device.type == "cuda" and not torch.cuda.is_available():
        return print_refusal("--device cuda but torch sees no GPU")
    summary = run_check(tiny=args.tiny, device=device, attention=args.attention, stages=args.stages,
                        warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s,
                        dtype=getattr(torch, args.dtype) if args.dtype else None, batch=args.batch,
                        skip_patch_weights=args.skip_patch_weights)
    print(format_table(summary))
    text = json.dumps(summary, default=str)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return 1 if _failed_correctness(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
